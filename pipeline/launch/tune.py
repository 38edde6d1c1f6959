"""A sweep's trials through Ray Tune: the only ray.tune import (ray.py stays the only Ray Train one).

Each Tune trial is an actor of no CPU (1 MiB of Ray's `memory` resource: Tune refuses an empty
request, and even 0.01 CPU would keep a 1-CPU node from a whole-CPU worker) that runs one trial as a normal
`pipeline train` process (its own driver, run dir, checkpoints, W&B run, exit codes) on the sweep's
Ray cluster (`cluster.address`, or the sweep's own local one), and reports the sweep's metric to Tune
at each of the run's evaluations, read from its metrics.jsonl, so that ASHA can stop it. A stopped
trial's process gets SIGTERM from the actor's cleanup and commits a checkpoint and closes its W&B run
like a preempted run (exit 75) before the actor goes; its run dir keeps what it logged and committed.
Tune's own Train V2 integration (a TorchTrainer inside each trial) would restart a dead trial from
scratch and rejects Tune's logger callbacks; a `pipeline train` process resumes from its own
checkpoints and logs to its own W&B run.

The driver's callbacks keep sweep.json current (status, step, best metric), so a sweep killed at any
moment continues from it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback  # this module is imported only by `pipeline sweep`

from pipeline.launch import ray_local
from pipeline.launch.sweep import FINISHED, Sweep, Trial, ask_trials

POLL_S = 1.0
TRIAL_ACTOR_MEMORY_BYTES = 1 << 20  # only for Ray's accounting (the module's doc)
STOP_GRACE_S = 60.0  # a stopped trial's commit of its checkpoint
# In a trial's last result when its run ended by itself (Tune also sets `done` when ASHA stops one)
RUN_ENDED = "run_ended"


def run(sweep: Sweep, echo: Any = print) -> None:
    """Run the sweep's unfinished trials to their end (or ASHA's stop), then (search: optuna) batch after
    batch of asked ones until the sweep has all its trials; sweep.json follows them."""
    pending = [t for t in sweep.trials if t.status not in FINISHED] or ask_trials(sweep)
    if not pending:
        return
    cluster = sweep.cfg.cluster
    if cluster.address:
        # how this process authenticates to the cluster, for the trials' drivers too (the token's path,
        # never the token: Tune keeps the trials' configs in its experiment state on disk)
        auth = {k: os.environ[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH") if k in os.environ}
        _batches(sweep, pending, address=cluster.address, node_ip=cluster.node_ip, env=auth, echo=echo)
        return
    per_trial = cluster.num_workers * cluster.cpus_per_worker
    num_cpus = max(os.cpu_count() or 1, per_trial * sweep.spec.max_concurrent)
    with ray_local.local_cluster(requested_ip=cluster.node_ip, num_cpus=num_cpus, run_dir=sweep.dir) as local:
        _batches(
            sweep, pending, address=local.address, node_ip=local.node_ip, env=local.driver_env, echo=echo
        )


def _batches(sweep: Sweep, pending: list[Trial], **where: Any) -> None:
    """`pending`, then each batch ask_trials gives (optuna's, told the batches before), until it gives
    none or a trial was preempted (SIGTERM: the sweep stops so that its requeue continues it)."""
    while pending:
        _tune(sweep, pending, **where)
        if any(t.status == "running" for t in pending):
            return
        pending = ask_trials(sweep)


def _tune(
    sweep: Sweep, pending: list[Trial], *, address: str, node_ip: str | None, env: dict[str, str], echo: Any
) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Tune's own console (a configuration box, progress tables, TensorBoard hints): off; the sweep
    # prints a line per trial event (_StateKeeper) and the table at the end
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from pipeline.launch.ray import _environ

    with _environ(env):
        import ray
        from ray import tune

        init: dict[str, Any] = {"address": address, "logging_config": ray.LoggingConfig(log_level="ERROR")}
        if node_ip:
            init["_node_ip_address"] = node_ip
        ray.init(**init, log_to_driver=False)
        # the GCS address itself, not "auto": the trials' drivers start in Tune's actors, which may not
        # find the cluster the way this process did (a Ray job's RAY_ADDRESS)
        address = ray.get_runtime_context().gcs_address
        try:
            tuner = tune.Tuner(
                tune.with_resources(_trainable(), {"cpu": 0, "memory": TRIAL_ACTOR_MEMORY_BYTES}),
                param_space={
                    "trial": tune.grid_search([t.id for t in pending]),
                    "job": _job(sweep, address, node_ip, env),
                },
                tune_config=tune.TuneConfig(
                    metric=sweep.metric,
                    mode=sweep.mode,
                    max_concurrent_trials=sweep.spec.max_concurrent,
                    scheduler=_scheduler(sweep),
                ),
                run_config=tune.RunConfig(
                    name=sweep.name,
                    storage_path=str(sweep.dir / "tune"),
                    callbacks=[_StateKeeper(sweep, echo)],
                    checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
                    verbose=0,
                ),
            )
            tuner.fit()
        finally:
            ray.shutdown()


def _job(sweep: Sweep, address: str, node_ip: str | None, env: dict[str, str]) -> dict[str, Any]:
    """What a trial actor needs to start its `pipeline train` process (plain values: Tune copies them)."""
    # Ray-launched trials train on the sweep's cluster; cluster.launcher=local trials are processes
    # of this machine (Tune only schedules them: a laptop's sweep)
    on_cluster = sweep.cfg.cluster.launcher == "ray"
    trials = {}
    for trial in sweep.trials:
        args = [sweep.config_path, *sweep.overrides, *trial.overrides(), *_trial_extra(sweep, trial)]
        if on_cluster:
            args.append(f"cluster.address={address}")
        if on_cluster and node_ip:
            args.append(f"cluster.node_ip={node_ip}")
        trials[trial.id] = args
    return {
        "trials": trials,
        "cwd": os.getcwd(),
        "env": env,
        "metric": sweep.metric,
        "sweep_dir": str(sweep.dir),
    }


def _trial_extra(sweep: Sweep, trial: Trial) -> list[str]:
    cfg = sweep.trial_config(trial)  # the same run dir, name, W&B group and tags as the plan checked
    wandb = cfg.tracking.wandb
    from pipeline.launch.sweep_spec import yaml_value

    return [
        f"run_dir={cfg.resolved_run_dir}",
        f"name={cfg.name}",
        f"tracking.wandb.group={wandb.group}",
        f"tracking.wandb.tags={yaml_value(list(wandb.tags))}",
        "resume=auto",
    ]


def _scheduler(sweep: Sweep) -> Any:
    spec = sweep.spec
    if not (spec.scheduler and spec.scheduler.asha):
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="step",
        max_t=sweep.cfg.train.max_steps,
        grace_period=spec.scheduler.asha.grace_steps,
        reduction_factor=spec.scheduler.asha.reduction_factor,
    )


def _die_with_parent() -> None:
    """In the trial's `pipeline train` process: SIGTERM when the Tune actor that started it dies (a
    stopped trial, a killed sweep): it commits and exits like a preempted run."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _trainable() -> type:
    """The Tune trainable of one trial: its `pipeline train` process, its evaluations reported as they
    are logged. A class, not a function: Tune stops a function trial without waiting for it (its
    cleanup does not join the thread) and Ray then ends the actor's child processes with SIGKILL,
    before the run could commit its checkpoint or close its W&B run; a class's cleanup runs to its end
    before the actor goes."""
    from ray import tune

    class TrialRun(tune.Trainable):
        def setup(self, config: dict[str, Any]) -> None:
            job, self.trial_id_ = config["job"], config["trial"]
            self.metric, self.run_dir = job["metric"], Path(job["sweep_dir"]) / self.trial_id_
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "console.log", "ab") as console:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "pipeline", "train", *job["trials"][self.trial_id_]],
                    cwd=job["cwd"],
                    env=os.environ | job["env"],
                    stdin=subprocess.DEVNULL,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent,
                )
            self.seen, self.queued, self.last = 0, [], {"step": 0}

        def step(self) -> dict[str, Any]:
            """The next evaluation the run logged (waiting for it); done once the run has ended."""
            while not self.queued:
                ended = self.proc.poll() is not None  # read what it logged after it ended, too
                rows, self.seen = _new_rows(self.run_dir / "metrics.jsonl", self.seen)
                self.queued = [
                    {"step": r["step"], self.metric: r[self.metric]} for r in rows if self.metric in r
                ]
                if self.queued:
                    break
                if ended:
                    if self.proc.returncode not in (0, 75):  # 75: preempted with a checkpoint
                        raise RuntimeError(
                            f"trial {self.trial_id_}: pipeline train exited {self.proc.returncode} "
                            f"(see {self.run_dir / 'console.log'})"
                        )
                    return {**self.last, "done": True, RUN_ENDED: True}
                time.sleep(POLL_S)
            self.last = self.queued.pop(0)
            return dict(self.last)

        def save_checkpoint(self, checkpoint_dir: str) -> dict[str, Any]:
            return {}  # nothing for Tune to keep: the run commits its own checkpoints in its run dir

        def load_checkpoint(self, checkpoint: Any) -> None:
            pass  # the run resumes from its run dir (resume=auto)

        def cleanup(self) -> None:
            if self.proc.poll() is None:  # stopped by the scheduler: commit, exit 75
                self.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=STOP_GRACE_S)
                if self.proc.poll() is None:
                    self.proc.kill()

    return TrialRun


def _preempted(run_dir: Path) -> bool:
    """Whether the trial's run last ended preempted (its `finish` event): not done, to be continued."""
    path = run_dir / "events.jsonl"
    if not path.is_file():
        return False
    finishes, _ = _new_rows(path, 0)
    finishes = [e for e in finishes if e.get("event") == "finish"]
    return bool(finishes and finishes[-1].get("preempted"))


def _new_rows(path: Path, seen: int) -> tuple[list[dict[str, Any]], int]:
    """The complete lines of metrics.jsonl after the first `seen` bytes, and the new byte count."""
    if not path.is_file():
        return [], seen
    with open(path, "rb") as f:
        f.seek(seen)
        data = f.read()
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows, seen + end


class _StateKeeper(Callback):
    """Tune's driver callbacks -> sweep.json (and a line on the console per trial event)."""

    def __init__(self, sweep: Sweep, echo: Any) -> None:
        self.sweep, self.echo = sweep, echo
        self.by_id = {t.id: t for t in sweep.trials}

    def _trial(self, trial: Any) -> Trial:
        return self.by_id[trial.config["trial"]]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        ours = self._trial(trial)
        ours.status = "running"
        self.sweep.save()
        self.echo(f"{ours.id} started: {' '.join(ours.overrides())}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        ours = self._trial(trial)
        value = result.get(self.sweep.metric)
        if value is None:  # the end of a run that never evaluated
            return
        ours.step = int(result.get("step", ours.step))
        if self.sweep.better(value, ours.metric):
            ours.metric = float(value)
        self.sweep.save()
        self.echo(f"{ours.id} step {ours.step}: {self.sweep.metric} {value:.4f}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        ours = self._trial(trial)
        reached = ours.step >= self.sweep.cfg.train.max_steps
        # a run that ended by itself on a SIGTERM from outside (not the scheduler's stop, after which
        # the run commits and ends too) committed a checkpoint: the next run of the sweep continues it
        ended = bool(trial.last_result.get(RUN_ENDED))  # not stopped by the scheduler
        if ended and not reached and _preempted(self.sweep.dir / ours.id):
            ours.status = "running"
        else:
            ours.status = "done" if reached else "stopped"
        self.sweep.save()
        self.echo(f"{ours.id} {ours.status} at step {ours.step}: {self.sweep.metric} {ours.metric}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        ours = self._trial(trial)
        ours.status = "failed"
        self.sweep.save()
        self.echo(f"{ours.id} failed: see {self.sweep.dir / ours.id / 'console.log'}")
