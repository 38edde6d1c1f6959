"""Launchers: cluster-facing glue, no training logic. `train(plan)` runs a planned run to the end."""

from __future__ import annotations

import signal
import time
from typing import Any

import psutil

from pipeline.checkpoint import lock
from pipeline.launch.plan import Plan, TrainingFailed, prepare_run_dir, worker_payload

__all__ = ["Plan", "TrainingFailed", "train"]
from pipeline.training import signals
from pipeline.training.state import new_run_id


def train(plan: Plan) -> dict[str, Any]:
    """Create the run dir, then run the workers with the configured launcher. Returns final metrics
    (`preempted` set when SIGTERM/SIGUSR1 made the workers commit and stop early)."""
    # One run per run dir (and checkpoint dir), held until this driver exits: exit 2 naming the holder
    with lock.hold(plan.cfg.resolved_run_dir, plan.cfg.checkpoint_dir):
        return _train_locked(plan)


def _train_locked(plan: Plan) -> dict[str, Any]:
    run_dir = prepare_run_dir(plan)
    payload = worker_payload(plan, run_id=new_run_id())
    # Wall-clock marks for the startup breakdown (the workers add theirs: one machine, one clock).
    payload["times"] = {"process_start": psutil.Process().create_time(), "launch": time.time()}
    signals.clear(run_dir)  # a STOP left by an earlier preempted segment must not stop this one
    previous = {
        sig: signal.signal(sig, lambda signum, frame: signals.request_stop(run_dir))
        for sig in signals.SIGNALS
    }
    try:
        if plan.cfg.cluster.launcher == "local":
            from pipeline.launch import local

            return local.run(payload, plan.world_size)
        from pipeline.launch import ray as ray_launcher

        return ray_launcher.run(payload)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signals.clear(run_dir)
