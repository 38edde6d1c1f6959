"""Run the loop in a Ray Train V2 TorchTrainer: the only ray import.

Without `cluster.address`, an in-process Ray cluster is started whose nodes use `cluster.node_ip`
(default 127.0.0.2): Ray rewrites 127.0.0.1 to the machine's external interface, so a laptop run would
otherwise send Ray's own traffic off loopback (ENVIRONMENT.md § Ray).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline import config as config_mod
from pipeline.data.shards import DataSpec
from pipeline.launch.plan import TrainingFailed
from pipeline.train import loop

DEFAULT_LOCAL_NODE_IP = "127.0.0.2"


def _train_fn(payload: dict[str, Any]) -> None:
    """Runs in every Ray Train worker. Ray has already set up torch.distributed (gloo or nccl)."""
    import ray.train
    import ray.util
    import torch

    ctx = ray.train.get_context()
    cfg = config_mod.from_dict(payload["config"])
    use_cuda = cfg.cluster.use_gpu and torch.cuda.is_available()
    local_rank = ctx.get_local_rank()
    env = loop.WorkerEnv(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=local_rank,
        device=f"cuda:{local_rank}" if use_cuda else "cpu",
        run_id=payload["run_id"],
        extra={
            "launch_id": payload["launch_id"],
            "node": ray.util.get_node_ip_address(),
            "times": payload.get("times", {}),
        },
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


def _worker_env_vars(cfg: config_mod.Config) -> dict[str, str]:
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        # Ray starts its workers at nice 15 so that its own daemons never starve; a training worker
        # that uses every core it was given then yields to every nice-0 process that wakes up. At 0
        # (what Ray's job supervisor sets for itself, the same way) ResNet-18 stepped ~3% faster
        # on 2 cores; the rest of the Ray gap there is the CPU its helper actors take (RESULTS.md).
        "RAY_worker_niceness": str(cfg.cluster.worker_niceness),
    }
    if not cfg.cluster.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for key in (
        "WANDB_MODE",
        "WANDB_API_KEY",
        "WANDB_PROJECT",
        "WANDB_ENTITY",
        "GLOO_SOCKET_IFNAME",
        "PIPELINE_FAULTS",
    ):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def run(payload: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = config_mod.from_dict(payload["config"])
    cluster = cfg.cluster
    runtime_env = {"env_vars": _worker_env_vars(cfg)}
    if cluster.address:
        init_kwargs: dict[str, Any] = {"address": cluster.address, "runtime_env": runtime_env}
        if cluster.node_ip:
            init_kwargs["_node_ip_address"] = cluster.node_ip
    else:
        needed_cpus = cluster.num_workers * cluster.cpus_per_worker
        init_kwargs = {
            # "local": always a new in-process cluster. Without it ray.init joins whatever cluster
            # /tmp/ray/ray_current_cluster names, even a stopped one (`ray start --block` ended by
            # a signal leaves that file behind), and then refuses num_cpus.
            "address": "local",
            "num_cpus": max(os.cpu_count() or 1, needed_cpus),
            "_node_ip_address": cluster.node_ip or DEFAULT_LOCAL_NODE_IP,
            "include_dashboard": False,
            "runtime_env": runtime_env,
        }
    ours = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    ray.init(**init_kwargs, log_to_driver=True, configure_logging=True, logging_level="WARNING")
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
            ),
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise TrainingFailed(str(e)) from e
        if result.error is not None:
            raise TrainingFailed(str(result.error))
        return dict(result.metrics or {})
    finally:
        ray.shutdown()


# --- `pipeline submit ray`: the Ray Job Submission API ---------------------------------------------

ACTIVE_JOB_STATES = {"PENDING", "RUNNING"}


def submission_id(cfg: config_mod.Config) -> str:
    """Stable per run (name + absolute run dir): re-submitting a run finds its earlier job."""
    import hashlib

    where = hashlib.sha256(str(cfg.resolved_run_dir.resolve()).encode()).hexdigest()[:8]
    return f"pipeline-{cfg.name}-{where}"


def _job_env_vars() -> dict[str, str]:
    keys = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL")
    keys += ("GLOO_SOCKET_IFNAME", "PIPELINE_FAULTS", "NCCL_SOCKET_IFNAME")
    # The driver's ray.init adds the workers' env vars (run()): let Ray merge them into the job's
    # runtime env (working dir included) instead of refusing the overlap.
    return {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"} | {
        k: os.environ[k] for k in keys if k in os.environ
    }


def submit_job(cfg: config_mod.Config, address: str, wait: bool, out: Any, poll_s: float = 1.0) -> int:
    """Submit `pipeline train` for `cfg` (a plan's config: local paths absolute, see plan._absolute)
    to the Ray cluster at `address` (its dashboard URL); with
    `wait`, print its logs until it ends. Returns the exit code to leave with: the driver's (75 for a
    preempted run), else 0 for SUCCEEDED and 1 otherwise.

    Re-submitting the same run (same name and run dir) attaches to its job while that one is active;
    after it ended (failed, stopped or done), the old job record is replaced and the new job resumes
    from the checkpoints in the run dir (`resume=auto`), with the same W&B run."""
    import shutil

    # Clusters from `ray start` want the token (Ray >= 2.52); Ray reads the mode when it is imported.
    if "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").is_file():
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
        with tempfile.TemporaryDirectory(prefix="pipeline-job-") as staging:
            # The job's working dir: this package's code and the config snapshot, nothing else
            # (Ray uploads it; data and checkpoints stay where the config's paths point).
            shutil.copytree(
                Path(__file__).resolve().parents[1],
                Path(staging) / "pipeline",
                ignore=shutil.ignore_patterns("__pycache__"),
            )
            Path(staging, "config.yaml").write_text(config_mod.dump_yaml(cfg))
            client.submit_job(
                entrypoint="python -m pipeline train config.yaml cluster.address=auto",
                submission_id=job_id,
                runtime_env={"working_dir": staging, "env_vars": _job_env_vars()},
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
