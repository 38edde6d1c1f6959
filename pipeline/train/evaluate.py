"""`pipeline eval`: score a committed checkpoint on its run's val shards, in one process, without
DeepSpeed (the consolidated fp32 weights in the run's precision)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline import models, tasks
from pipeline.checkpoint import commit, export
from pipeline.config import Config
from pipeline.data.shards import DataSpec
from pipeline.data.stream import eval_batches
from pipeline.data.transforms import normalize


def find_checkpoint(target: Path) -> Path:
    """A checkpoint dir, or the newest commit of a run dir."""
    ckpt = commit.find(target)
    if ckpt is None:
        raise commit.CheckpointError(f"{target} is neither a checkpoint nor a run dir with one")
    return ckpt


def evaluate_checkpoint(cfg: Config, spec: DataSpec, ckpt: Path) -> dict[str, Any]:
    """The run's task metrics of a checkpoint: every engine's consolidated weights, one process."""
    manifest = commit.read_manifest(ckpt)
    meta = manifest["model"]
    model = models.build(meta["name"], meta["args"], meta["input_shape"], meta["num_classes"])
    task_meta = manifest.get("task", {"name": "classify", "args": {}})
    task = tasks.build(task_meta["name"], task_meta["args"])
    parts = task.split(model)
    for name, module in parts.items():  # verifies the files first
        module.load_state_dict(export.consolidated_state_dict(ckpt, name), strict=True)
    model.eval()
    mean, std = task.normalization(spec.mean, spec.std)
    sums = torch.zeros(task.EVAL_SUMS)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        for batch in eval_batches(spec, cfg.data, rank=0, world_size=1):
            sums += task.eval_sums(parts, normalize(batch.x, mean, std), batch.y)
    return {"checkpoint": str(ckpt), "step": manifest["step"], **task.eval_metrics(sums)}
