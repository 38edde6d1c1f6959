"""What the loop reports besides its losses: the optimizer's state (LR per param group, fp16 loss
scale, overflow-skipped steps, grad norm), peak memory, and rank 0's start summary."""

from __future__ import annotations

import os
import resource
import socket
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config
from pipeline.data.shards import DataSpec
from pipeline.training import collectives


def optimizer_metrics(engines: dict[str, Any], main: str) -> dict[str, float]:
    """`train/lr` (the main engine's first group) and, per engine of a multi-engine task
    (`train/lr/<engine>`), per param group when there are several (`.../group<i>`: weight decay or
    `init_from.lr_mult` groups), the fp16 loss scale and overflow-skipped steps, and the grad norm."""
    metrics: dict[str, float] = {"train/lr": engines[main].lr()[0]}
    for name, engine in engines.items():
        suffix = "" if len(engines) == 1 else f"/{name}"
        lrs = engine.lr()
        if suffix:
            metrics[f"train/lr{suffix}"] = lrs[0]
        if len(lrs) > 1:
            metrics |= {f"train/lr{suffix}/group{i}": lr for i, lr in enumerate(lrs)}
        if (scale := engine.loss_scale()) is not None:
            metrics[f"train/loss_scale{suffix}"] = scale
            metrics[f"train/overflow_steps{suffix}"] = engine.overflow_steps()
    if (grad_norm := engines[main].grad_norm()) is not None:
        metrics["train/grad_norm"] = grad_norm
    return metrics


def peak_memory_mb(device: str) -> dict[str, float]:
    """Collective: the highest peak over ranks of the process RSS and, on CUDA, of allocated GPU
    memory, in MiB (what decides whether a bigger batch or a lower ZeRO stage would fit)."""
    # ru_maxrss is in KiB on Linux: the worker process itself, not its DataLoader processes.
    peaks = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
    if device.startswith("cuda"):
        peaks.append(torch.cuda.max_memory_allocated(device) / 2**20)
    reduced = collectives.all_reduce(torch.tensor(peaks, dtype=torch.float64, device=device), "max").tolist()
    names = ["sys/peak_rss_mb", "sys/peak_gpu_mem_mb"]
    return dict(zip(names, reduced, strict=False))


def _parameter_counts(engines: dict[str, Any]) -> tuple[int, int]:
    trainable = frozen = 0
    for engine in engines.values():
        for p in engine.module.parameters():
            n = getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves an empty shard in p; ds_numel is all
            if p.requires_grad:
                trainable += n
            else:
                frozen += n
    return trainable, frozen


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


def start_summary(
    *,
    cfg: Config,
    spec: DataSpec,
    engines: dict[str, Any],
    batches: Any,
    device: str,
    resume_step: int | None,
    resume_from: str | None,
    wandb_location: str,
    node: str | None = None,
) -> dict[str, Any]:
    """Collective (one gather): what a user checks before trusting a run's first step. `node` names
    this worker's node (Ray's node IP; default: the host name)."""
    shards, samples = batches.assignment()
    ranks = collectives.gather_objects(
        {
            "node": node or socket.gethostname(),
            "niceness": os.nice(0),  # Ray's default for workers is 15 (cluster.worker_niceness)
            "device": _device_name(device),
            "shards": shards,
            "samples": samples,
        }
    )
    trainable, frozen = _parameter_counts(engines)
    offload = {"optimizer": cfg.zero.offload_optimizer, "params": cfg.zero.offload_params}
    return {
        "world_size": len(ranks),
        "backend": collectives.backend(),
        "nodes": [r["node"] for r in ranks],
        "niceness": [r["niceness"] for r in ranks],
        "devices": [r["device"] for r in ranks],
        "precision": cfg.precision,
        "zero_stage": cfg.zero.stage,
        "offload": [part for part, on in offload.items() if on],
        "compile": cfg.train.compile_options,  # torch.compile's options, or None
        "params_trainable": trainable,
        "params_frozen": frozen,
        "train_shards": len(spec.train_urls),
        "train_samples": spec.train_samples,
        "shards_per_rank": [r["shards"] for r in ranks],
        "samples_per_rank": [r["samples"] for r in ranks],
        "resume_step": resume_step,
        "resume_from": resume_from,
        "run_dir": str(cfg.resolved_run_dir),
        "wandb": wandb_location,
    }


def format_start_summary(name: str, run_id: str, s: dict[str, Any]) -> str:
    def spread(values: list[int]) -> str:
        return f"{min(values):,}" if min(values) == max(values) else f"{min(values):,}-{max(values):,}"

    devices, nodes = sorted(set(s["devices"])), sorted(set(s["nodes"]))
    start = (
        f"resuming after step {s['resume_step']} from {s['resume_from']}"
        if s["resume_from"]
        else "fresh start"
    )
    lines = [
        f"run {name} (id {run_id}): {start}",
        f"  workers    {s['world_size']} on {len(nodes)} node(s) {', '.join(nodes)}; "
        f"backend {s['backend']}; {', '.join(devices)}",
        f"  math       {s['precision']} ({s.get('precision_reason', 'set in the config')}), "
        f"ZeRO stage {s['zero_stage']}"
        + (f", offload {'+'.join(s['offload'])}" if s["offload"] else "")
        + (f", torch.compile mode {s['compile']['mode']}" if s.get("compile") else ""),
        f"  params     {s['params_trainable']:,} trainable, {s['params_frozen']:,} frozen",
        f"  envs       {s['environment']}"
        if s.get("environment")
        else f"  data       {s['train_shards']} train shards, {s['train_samples']:,} samples; per worker "
        f"{spread(s['shards_per_rank'])} shards, {spread(s['samples_per_rank'])} samples this epoch",
        *([f"  init_from  {format_init(s['init_from'])}"] if s.get("init_from") else []),
        f"  run dir    {Path(s['run_dir']).resolve()}",
        f"  W&B        {s['wandb']}",
    ]
    return "\n".join(lines)


def format_init(init: dict[str, Any]) -> str:
    """One line: what `init_from` loaded (finetune.apply_init's report) and which BatchNorm it holds."""
    parts = []
    if "loaded" in init:
        excluded = init["excluded"]
        shown = ", ".join(excluded[:4]) + (f" (+{len(excluded) - 4} more)" if len(excluded) > 4 else "")
        parts.append(
            f"{init['loaded']} tensors from {init['path']}" + (f"; fresh: {shown}" if excluded else "")
        )
        parts += init["adapted"]
    if init.get("batchnorm_held"):
        parts.append(f"{init['batchnorm_held']} frozen BatchNorm layers keep their running statistics")
    return "; ".join(parts)


def startup_phases(marks: dict[str, float]) -> dict[str, float]:
    """Seconds from the `pipeline train` process start to the first step done, and how they split.
    `marks` holds wall-clock times (one machine): process_start and launch from the driver, ray_ready
    from the Ray launcher, then worker, engines, loop, first_step and first_batch_wait (a duration)
    from the worker, and compile (a duration, with train.compile)."""
    start = marks.get("process_start", marks["worker"])
    launched = marks.get("launch", start)
    ready = marks.get("ray_ready", launched)
    phases = {
        "startup_s": marks["first_step"] - start,
        "cli_and_plan_s": launched - start,  # imports, config and data validation, run dir
        "ray_start_s": ready - launched,  # ray.init (0 with the local launcher)
        "worker_group_s": marks["worker"] - ready,  # worker processes, torch.distributed
        "deepspeed_init_s": marks["engines"] - marks["worker"],  # models, engines, checkpoint load
        "data_and_tracking_s": marks["loop"] - marks["engines"],  # loader processes, W&B, summary
        "first_batch_s": marks["first_batch_wait"],
    }
    phases["first_step_s"] = marks["first_step"] - marks["loop"] - marks["first_batch_wait"]
    if "compile" in marks:  # train.compile: the part of the first step torch.compile took
        phases["compile_s"] = marks["compile"]
    return {k: round(v, 3) for k, v in phases.items()}
