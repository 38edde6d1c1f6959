"""Launchers: cluster-facing glue, no training logic. `train(plan)` runs a planned run to the end."""

from __future__ import annotations

from typing import Any

from pipeline.launch.plan import Plan, TrainingFailed, prepare_run_dir, worker_payload

__all__ = ["Plan", "TrainingFailed", "train"]
from pipeline.train.state import new_run_id


def train(plan: Plan) -> dict[str, Any]:
    """Create the run dir, then run the workers with the configured launcher. Returns final metrics."""
    prepare_run_dir(plan)
    payload = worker_payload(plan, run_id=new_run_id())
    if plan.cfg.cluster.launcher == "local":
        from pipeline.launch import local

        return local.run(payload, plan.world_size)
    from pipeline.launch import ray as ray_launcher

    return ray_launcher.run(payload)
