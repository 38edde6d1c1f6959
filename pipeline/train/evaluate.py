"""`pipeline eval`: score a committed checkpoint on its run's val shards, in one process, without
DeepSpeed (the consolidated fp32 weights in the run's precision)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline import models
from pipeline.checkpoint import commit, export
from pipeline.config import Config
from pipeline.data.shards import DataSpec
from pipeline.data.stream import eval_batches
from pipeline.data.transforms import normalize
from pipeline.tasks import classify


def find_checkpoint(target: Path) -> Path:
    """A checkpoint dir, or the newest commit of a run dir."""
    ckpt = commit.find(target)
    if ckpt is None:
        raise commit.CheckpointError(f"{target} is neither a checkpoint nor a run dir with one")
    return ckpt


def evaluate_checkpoint(cfg: Config, spec: DataSpec, ckpt: Path) -> dict[str, Any]:
    meta = commit.read_manifest(ckpt)["model"]
    model = models.build(meta["name"], meta["args"], meta["input_shape"], meta["num_classes"])
    model.load_state_dict(export.consolidated_state_dict(ckpt), strict=True)  # verifies the files first
    model.eval()
    sums = torch.zeros(3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        for batch in eval_batches(spec, cfg.data, rank=0, world_size=1):
            sums += classify.eval_sums(model, normalize(batch.x, spec.mean, spec.std), batch.y)
    return {
        "checkpoint": str(ckpt),
        "step": commit.read_manifest(ckpt)["step"],
        **classify.eval_metrics(sums),
    }
