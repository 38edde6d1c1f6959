"""Run the loop in a Ray Train V2 TorchTrainer: the only ray import.

Without `cluster.address`, the run starts its own one-node Ray cluster (ray_local: its own session,
loopback only, its own token) and the driver joins it by address, as it joins `cluster.address`.

The console shows our own lines (rank 0's start summary and progress, warnings, errors); Ray's
INFO/WARNING chatter from its actors and workers stays in its log files, copied into RUN_DIR/logs/
at the end (the driver's own Ray log: RUN_DIR/logs/ray.log). `pipeline train --verbose`
(PIPELINE_VERBOSE=1) shows it all, as Ray prints it. On a terminal the workers' progress lines come to
the driver as relay lines (tracking.ProgressRelay) and are drawn as one live bar.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline import config as config_mod
from pipeline import imports, secrets, tracking
from pipeline.data.shards import DataSpec
from pipeline.launch import ray_local
from pipeline.launch.plan import TrainingFailed, installed_dirs, user_code
from pipeline.training import loop


def _train_fn(payload: dict[str, Any]) -> None:
    """Runs in every Ray Train worker. Ray has already set up torch.distributed (gloo or nccl)."""
    import ray.train
    import ray.util
    import torch

    # Before anything is built: users' modules import from where the driver found them (Ray workers
    # start in another cwd and do not inherit the driver's sys.path, e.g. a notebook's).
    imports.add_paths(payload.get("module_roots", []))
    ctx = ray.train.get_context()
    if not tracking.verbose():
        _quiet_worker_console()
    cfg = config_mod.from_dict(payload["config"])
    use_cuda = cfg.cluster.use_gpu and torch.cuda.is_available()
    local_rank = ctx.get_local_rank()
    env = loop.WorkerEnv(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        device=f"cuda:{local_rank}" if use_cuda else "cpu",
        run_id=payload["run_id"],
        launch_id=payload["launch_id"],
        node=ray.util.get_node_ip_address(),
        startup_marks=payload.get("times", {}),
    )
    final = loop.run(cfg, DataSpec.from_dict(payload["spec"]), env, payload["resume_from"])
    metrics = {k: v for k, v in final.items() if v is not None}
    # Train V2 hands metrics to the driver only together with a checkpoint, so rank 0 reports a tiny
    # one: a pointer to our own committed checkpoint (the weights stay where the commit put them).
    # Every rank must call report (it is gathered from all workers); the metrics are identical.
    with tempfile.TemporaryDirectory() as pointer_dir:
        checkpoint = None
        if env.is_rank0:
            Path(pointer_dir, "pointer.json").write_text(json.dumps(metrics, indent=2))
            checkpoint = ray.train.Checkpoint.from_directory(pointer_dir)
        ray.train.report(metrics, checkpoint=checkpoint)


def _quiet_worker_console() -> None:
    """Ray Train gives a worker's root logger a console handler at INFO, which forwards its own INFO
    lines ("Reporting training result ..." comes from a logger outside "ray.train", so RunConfig's
    level misses it); warnings and errors still reach the console, INFO only Ray Train's log files."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))


# A C++ log line of a Ray process ("[2026-01-01 12:00:00,000 E 123 456] core_worker.cc:2465: ..."),
# as forwarded to the driver: Ray's own diagnostics; errors that matter fail the run anyway.
_RAY_CORE_LOG_LINE = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,.]+ [DIWEF] \d+ \d+\] [\w/.-]+\.(cc|h):\d+:")


def _divert_ray_core_line(line: str) -> bool:
    """Quiet mode: Ray's C++ log lines go to RUN_DIR/logs/ray.log, not the console."""
    if _RAY_CORE_LOG_LINE.match(line.lstrip()) is None:
        return False
    logging.getLogger("ray").info("%s", line)
    return True


def bind_store_to_node() -> None:
    """Every Ray worker process, at its start (runtime_env's worker_process_setup_hook): rank 0's
    TCPStore, the rendezvous of the process group Ray Train sets up (env://), listens on the node's
    address (MASTER_ADDR: 127.0.0.1 on the local cluster), not on every interface as torch binds it
    given any host name. It is unauthenticated: anyone who reaches it can join or stall the group."""
    import importlib
    import socket

    # the module (torch.distributed.rendezvous is also a function: `import ... as` would bind that)
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    original = rendezvous._create_c10d_store
    if getattr(original, "bound_to_node", False):
        return

    def create_store(hostname, port, rank, world_size, timeout, use_libuv=True):  # torch's signature
        if rank != 0 or rendezvous._torchelastic_use_agent_store():
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        try:
            listen_fd = socket.create_server((hostname, port), backlog=128).detach()
        except OSError:  # not an address of this machine (a NAT'd node IP): torch's own bind
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        return rendezvous.TCPStore(
            hostname,
            port,
            world_size,
            is_master=True,
            timeout=timeout,
            multi_tenant=True,
            master_listen_fd=listen_fd,
            use_libuv=use_libuv,
        )

    create_store.bound_to_node = True
    rendezvous._create_c10d_store = create_store


def _worker_env_vars(cfg: config_mod.Config) -> dict[str, str]:
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        # Ray starts its workers at nice 15 so that its own daemons never starve; a training worker
        # that uses every core it was given then yields to every nice-0 process that wakes up. At 0
        # (what Ray's job supervisor sets for itself, the same way) ResNet-18 stepped ~3% faster
        # on 2 cores; the rest of the Ray gap there is the CPU its helper actors take (RESULTS.md).
        "RAY_worker_niceness": str(cfg.cluster.worker_niceness),
        # Ray Train sends every print() of a worker through a logger as well, and tees it to stdout
        # when W&B has wrapped sys.stdout: each line of ours came out twice (the start summary).
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    if not cfg.cluster.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    # Never a credential (WANDB_API_KEY, pipeline.secrets.ENV): Ray logs a runtime env in clear, to
    # session logs others can read. The in-process cluster's workers inherit them from this process
    # (its raylet does); a running cluster's workers (`cluster.address`) read their own environment.
    for key in (
        "WANDB_MODE",
        "WANDB_PROJECT",
        "WANDB_ENTITY",
        "GLOO_SOCKET_IFNAME",
        "PIPELINE_FAULTS",
        tracking.VERBOSE_ENV,
    ):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def _driver_ray_log(run_dir: Path, verbose: bool) -> logging.Handler:
    """The driver's "ray" logger: everything into RUN_DIR/logs/ray.log; on the console only errors
    (everything with --verbose)."""
    secrets.private_dir(run_dir / "logs")  # 0700: logs may quote what surrounds a credential
    handler = logging.FileHandler(run_dir / "logs" / "ray.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    ray_logger = logging.getLogger("ray")
    if not verbose:
        for old in ray_logger.handlers[:]:
            old.setLevel(logging.ERROR)
    ray_logger.setLevel(logging.INFO)
    ray_logger.addHandler(handler)
    return handler


def _failure_message(error: Exception, cfg: config_mod.Config) -> str:
    """Each failed rank with its root cause (exception type and message), instead of Ray's summary,
    which repeats every traceback the workers already printed above it."""
    failures = getattr(error, "worker_failures", None)  # a WorkerGroupError: {rank: exception}
    if not failures:
        return str(error)
    cluster = cfg.cluster
    causes = {rank: _root_cause(exc) for rank, exc in sorted(failures.items())}
    message = "; ".join(f"rank {rank}: {cause}" for rank, cause in causes.items())
    silent = sorted(set(range(cluster.num_workers)) - set(failures))
    if silent and all(re.search(r"tim(ed|ing) out", cause, re.IGNORECASE) for cause in causes.values()):
        # the rank that hangs raises nothing: the others' collectives give up on it
        message += (
            f" (a collective waited cluster.collective_timeout_s={cluster.collective_timeout_s} s for "
            f"rank(s) {', '.join(map(str, silent))}, which raised nothing: hung or too slow)"
        )
    return (
        f"{message} (after cluster.max_failures={cluster.max_failures} restart(s); the traceback is "
        f"above and in {cfg.resolved_run_dir / 'logs'})"
    )


def _root_cause(exc: BaseException) -> str:
    """`Type: first line of the message`: a dead worker's error (RayActorError) runs to many lines."""
    # Ray's wrappers: a RayTaskError (what the task raised), a failed health check (a dead worker)
    for wrapped in ("cause", "health_check_failure"):
        inner = getattr(exc, wrapped, None)
        exc = inner if isinstance(inner, BaseException) else exc
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else '(no message)'}"


def run(payload: dict[str, Any]) -> dict[str, Any]:
    """Train on the cluster at `cluster.address`, or on the run's own local cluster (ray_local: its
    own session, loopback only, its own token), which is stopped when the run ends."""
    cfg = config_mod.from_dict(payload["config"])
    cluster = cfg.cluster
    if cluster.address:
        return _fit(payload, cfg, address=cluster.address, node_ip=cluster.node_ip)
    needed_cpus = cluster.num_workers * cluster.cpus_per_worker
    with (
        ray_local.local_cluster(
            requested_ip=cluster.node_ip,
            num_cpus=max(os.cpu_count() or 1, needed_cpus),
            run_dir=cfg.resolved_run_dir,
        ) as local,
        _environ(local.driver_env),
    ):
        return _fit(payload, cfg, address=local.address, node_ip=local.node_ip, local=True)


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ (and no RAY_AUTH_TOKEN, which would win over the cluster's token file)
    while the driver talks to the local cluster; the process's own environment back afterwards."""
    saved = {key: os.environ.get(key) for key in [*values, "RAY_AUTH_TOKEN"]}
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(values)
    _reload_ray_settings()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reload_ray_settings()


def _reload_ray_settings() -> None:
    """Ray reads the auth mode, the token and whether 127.0.0.1 is rewritten (ray_local's doc) once,
    when imported; a Python session may run several trainings, each with its own cluster and token."""
    import ray._private.ray_constants as ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")  # as Ray's own token setup does after it sets RAY_AUTH_MODE
    AuthenticationTokenLoader.instance().reset_cache()
    ray_constants.ENABLE_RAY_CLUSTER = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0"


def _fit(
    payload: dict[str, Any], cfg: config_mod.Config, *, address: str, node_ip: str | None, local: bool = False
) -> dict[str, Any]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cluster = cfg.cluster
    verbose = tracking.verbose()
    # A worker's stdout is a file that Ray forwards line by line; on a terminal, rank 0 sends relay
    # lines and this process draws them as one live bar (ProgressRelay below).
    progress = os.environ.get(tracking.PROGRESS_ENV) or ("relay" if sys.stdout.isatty() else "plain")
    runtime_env = {
        "env_vars": _worker_env_vars(cfg) | {tracking.PROGRESS_ENV: progress},
        "worker_process_setup_hook": "pipeline.launch.ray.bind_store_to_node",
    }
    # By address, never by discovery (/tmp/ray/ray_current_cluster, a scan for GCS processes):
    # another run's cluster may be running on this machine.
    init_kwargs: dict[str, Any] = {"address": address, "runtime_env": runtime_env}
    if node_ip:
        init_kwargs["_node_ip_address"] = node_ip
    if not verbose:
        # ERROR for the "ray" and root loggers of every process of this job (the Train controller, the
        # PlacementGroupCleaner that warns every few seconds without the dashboard's State API, the
        # workers); Ray Train's own logger gets RunConfig's level below. It also drops the
        # "(RayTrainWorker pid=...)" prefix from forwarded lines.
        init_kwargs["logging_config"] = ray.LoggingConfig(log_level="ERROR")
    root = logging.getLogger()
    root_state = root.level, root.handlers[:]
    ours = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        ray.init(**init_kwargs, log_to_driver=True, configure_logging=True, logging_level="WARNING")
    except Exception as e:  # the run's own cluster is up but does not take the driver: the machine
        if not local:
            raise
        raise ray_local.RayStartFailed(f"the driver could not join the run's local Ray cluster: {e}") from e
    root.setLevel(root_state[0])  # the LoggingConfig is for Ray's processes, not for this one's root
    root.handlers[:] = root_state[1]
    log_handler = _driver_ray_log(cfg.resolved_run_dir, verbose)
    # ray.init installs a C++ handler that dies on SIGTERM; put back ours, which asks the workers to
    # commit a checkpoint and stop (exit 75).
    for sig, handler in ours.items():
        if callable(handler):
            signal.signal(sig, handler)
    payload.setdefault("times", {})["ray_ready"] = time.time()
    try:
        trainer = TorchTrainer(
            _train_fn,
            train_loop_config=payload,
            torch_config=TorchConfig(
                backend="nccl" if cluster.use_gpu else "gloo", timeout_s=cluster.collective_timeout_s
            ),
            scaling_config=ray.train.ScalingConfig(
                num_workers=cluster.num_workers,
                use_gpu=cluster.use_gpu,
                resources_per_worker={"CPU": cluster.cpus_per_worker},
            ),
            run_config=ray.train.RunConfig(
                name=cfg.name,
                storage_path=str(cfg.resolved_run_dir / "ray"),
                failure_config=ray.train.FailureConfig(max_failures=cluster.max_failures),
                # "Reporting training result ...", "Setting up process group ...": INFO
                logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
            ),
        )
        # Ray prints the workers' lines to this process's stdout/stderr: through the relay, which
        # draws the live bar on a terminal and (quiet) keeps Ray's C++ log lines off the console.
        relay = tracking.ProgressRelay(
            live=progress == "relay", divert=None if verbose else _divert_ray_core_line
        )
        try:
            with relay if progress == "relay" or not verbose else contextlib.nullcontext():
                result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise TrainingFailed(_failure_message(e, cfg)) from e
        if result.error is not None:
            raise TrainingFailed(str(result.error))
        return dict(result.metrics or {})
    finally:
        ray.shutdown()
        logging.getLogger("ray").removeHandler(log_handler)
        log_handler.close()


# --- `pipeline submit ray`: the Ray Job Submission API ---------------------------------------------

ACTIVE_JOB_STATES = {"PENDING", "RUNNING"}


def submission_id(cfg: config_mod.Config) -> str:
    """Stable per run (name + absolute run dir): re-submitting a run finds its earlier job."""
    import hashlib

    where = hashlib.sha256(str(cfg.resolved_run_dir.resolve()).encode()).hexdigest()[:8]
    return f"pipeline-{cfg.name}-{where}"


def _job_env_vars() -> dict[str, str]:
    # No WANDB_API_KEY (nor any credential): a job's runtime env is logged in clear on the cluster
    # (`_job_config_text`).
    keys = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL")
    keys += ("GLOO_SOCKET_IFNAME", "PIPELINE_FAULTS", "NCCL_SOCKET_IFNAME")
    # The driver's ray.init adds the workers' env vars (run()): let Ray merge them into the job's
    # runtime env (working dir included) instead of refusing the overlap.
    return {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"} | {
        k: os.environ[k] for k in keys if k in os.environ
    }


def _job_config_text(job_cfg: config_mod.Config, out: Any) -> str:
    """The job's config.yaml: without the credentials of storage_options (not even redacted: the
    cluster has no PIPELINE_SECRETS), so s3fs/boto on the cluster use the nodes' own credentials."""
    import yaml

    tree = job_cfg.to_dict()
    if dropped := secrets.strip(tree):
        out.write(
            f"note: {', '.join(dropped)} not sent with the job (Ray keeps a job's files and env in "
            "clear): the cluster's nodes read credentials from their own environment "
            "(AWS_ACCESS_KEY_ID, ...) or ~/.aws/credentials\n"
        )
    if os.environ.get("WANDB_API_KEY"):
        out.write(
            "note: WANDB_API_KEY not sent with the job: the cluster's nodes need their own "
            "(their environment, or `wandb login`)\n"
        )
    return yaml.safe_dump(tree, sort_keys=False)


def _module_source(path: str, key: str) -> Path | None:
    """The package dir (or single-module .py file) that holds the module of import path `path`, as
    imported here; None for this package's own modules (the job's working dir has them)."""
    imports.load_object(path, key=key)  # imported by the preflight already: a dict lookup
    top = path.rpartition(":")[0].split(".")[0]
    module = sys.modules[top]
    if top == "pipeline":
        return None
    locations = list(getattr(module, "__path__", []))
    if len(locations) > 1 or (not locations and getattr(module, "__file__", None) is None):
        raise config_mod.ConfigError(
            f"config key '{key}': '{top}' is a namespace package spread over several directories; "
            "ship its parts with --py-modules DIR"
        )
    return imports.top_level_source(module)


def job_code(
    cfg: config_mod.Config, extra: list[str], staging: Path, out: Any
) -> tuple[config_mod.Config, list[str]]:
    """What a Ray job ships besides this package, for workers on every node to import (Ray's runtime
    env `py_modules`): the package or module of each import path in the config, each `file.py:Name`
    wrapped into a package of its own (the config then names `_pipeline_file_<hash>.<stem>:Name`, so
    no cluster path is assumed and no stdlib module is shadowed), and the `extra` paths
    (`--py-modules`: package dirs, .py files or wheels). Returns (the config to submit, py_modules)."""
    import hashlib

    tree = cfg.to_dict()
    shipped: list[str] = []
    installed = installed_dirs()
    for key, path in user_code(cfg).items():
        module, _, attr = path.rpartition(":")
        section, _, field = key.partition(".")
        if imports.is_file_path(module):
            source = Path(module).resolve()
            package = f"_pipeline_file_{hashlib.sha256(str(source).encode()).hexdigest()[:10]}"
            stem = re.sub(r"\W", "_", source.stem)
            stem = stem if stem[:1].isalpha() else f"m_{stem}"
            wrapped = staging / "py_modules" / package
            wrapped.mkdir(parents=True, exist_ok=True)
            (wrapped / "__init__.py").write_text("")
            shutil.copyfile(source, wrapped / f"{stem}.py")
            tree[section][field] = f"{package}.{stem}:{attr}"
            where = wrapped
        else:
            found = _module_source(path, key)
            if found is None:
                continue
            if any(found.is_relative_to(d) for d in installed):
                out.write(
                    f"note: {key}={path} comes from an installed package ({found}), not shipped: "
                    "the cluster's environment must have it (or pass --py-modules)\n"
                )
                continue
            where = found
        if str(where) not in shipped:
            shipped.append(str(where))
    for item in extra:
        extra_path = Path(item).expanduser().resolve()
        if not (extra_path.is_dir() or (extra_path.suffix in (".py", ".whl") and extra_path.is_file())):
            raise config_mod.ConfigError(
                f"--py-modules {item}: not a package directory, .py file or .whl file"
            )
        if str(extra_path) not in shipped:
            shipped.append(str(extra_path))
    return config_mod.from_dict(tree), shipped


AGENT_WAIT_S = 60.0


def _submit_when_an_agent_is_up(client: Any, **job: Any) -> None:
    """client.submit_job, again while a cluster that just started has no dashboard agent to take
    it yet (HTTP 500 "No available agent"), for at most AGENT_WAIT_S."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(**job)
            return
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def submit_job(
    cfg: config_mod.Config,
    address: str,
    wait: bool,
    out: Any,
    poll_s: float = 1.0,
    py_modules: list[str] | None = None,
    sweep_text: str | None = None,
) -> int:
    """Submit `pipeline train` for `cfg` (a plan's config: local paths absolute, see plan._absolute)
    to the Ray cluster at `address` (its dashboard URL); with
    `wait`, print its logs until it ends. Returns the exit code to leave with: the driver's (75 for a
    preempted run), else 0 for SUCCEEDED and 1 otherwise. The users' code the config names and
    `py_modules` travel with the job (`job_code`).

    Re-submitting the same run (same name and run dir) attaches to its job while that one is active;
    after it ended (failed, stopped or done), the old job record is replaced and the new job resumes
    from the checkpoints in the run dir (`resume=auto`), with the same W&B run."""
    # Clusters from `ray start` want the token (Ray >= 2.52): where the user has one (RAY_AUTH_TOKEN_PATH,
    # as cluster/local-2node.sh prints, RAY_AUTH_TOKEN or Ray's ~/.ray/auth_token), token auth is on.
    # Ray reads the mode when it is imported.
    has_token = {"RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"} & os.environ.keys()
    if "RAY_AUTH_MODE" not in os.environ and (has_token or (Path.home() / ".ray" / "auth_token").is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise config_mod.ConfigError(f"no Ray cluster at {address} (the dashboard address): {e}") from None
    job_id = submission_id(cfg)
    previous = {job.submission_id: job for job in client.list_jobs() if job.submission_id}.get(job_id)
    if previous is not None and str(previous.status) in ACTIVE_JOB_STATES:
        out.write(f"job {job_id} is already {previous.status}: following it\n")
    else:
        if previous is not None:
            out.write(f"job {job_id} ended {previous.status} before: submitting it again (it resumes)\n")
            client.delete_job(job_id)
        with tempfile.TemporaryDirectory(prefix="pipeline-job-") as staging_root:
            # The job's working dir: this package's code and the config snapshot, nothing else
            # (Ray uploads it; data and checkpoints stay where the config's paths point).
            staging = Path(staging_root) / "job"
            shutil.copytree(
                Path(__file__).resolve().parents[1],
                staging / "pipeline",
                ignore=shutil.ignore_patterns("__pycache__"),
            )
            job_cfg, modules = job_code(cfg, py_modules or [], Path(staging_root), out)
            (staging / "config.yaml").write_text(_job_config_text(job_cfg, out))
            command = "train config.yaml"
            if sweep_text is not None:  # the sweep's driver runs as the job; its trials on the cluster
                (staging / "sweep.yaml").write_text(sweep_text)
                command = "sweep config.yaml sweep.yaml"
            runtime_env: dict[str, Any] = {"working_dir": str(staging), "env_vars": _job_env_vars()}
            if modules:
                # Ray unpacks them on every node and puts them on the job's (driver's and workers')
                # Python path: users' modules import the same everywhere
                runtime_env["py_modules"] = modules
                out.write(f"shipping your code with the job: {', '.join(modules)}\n")
            _submit_when_an_agent_is_up(
                client,
                entrypoint=f"python -m pipeline {command} cluster.address=auto",
                submission_id=job_id,
                runtime_env=runtime_env,
                metadata={"run_dir": str(cfg.resolved_run_dir), "name": cfg.name},
            )
        out.write(f"submitted Ray job {job_id} to {address}; run dir {cfg.resolved_run_dir}\n")
    out.flush()
    if not wait:
        return 0
    printed = 0
    while True:
        status = str(client.get_job_status(job_id))
        logs = client.get_job_logs(job_id)
        out.write(logs[printed:])
        out.flush()
        printed = len(logs)
        if status not in ACTIVE_JOB_STATES:
            break
        time.sleep(poll_s)
    info = client.get_job_info(job_id)
    out.write(f"[ray] job {job_id}: {status}{f' ({info.message})' if info.message else ''}\n")
    if info.driver_exit_code is not None:
        return int(info.driver_exit_code)
    return 0 if status == "SUCCEEDED" else 1
