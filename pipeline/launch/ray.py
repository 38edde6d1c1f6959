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
        extra={"launch_id": payload["launch_id"]},
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
    env = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
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
