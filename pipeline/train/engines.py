"""Build a task's engines from the config, and load them from a checkpoint. Collective: every rank
builds and loads the engines in the same order (DeepSpeed broadcasts and partitions here)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline import models
from pipeline.config import Config
from pipeline.data.shards import DataSpec
from pipeline.engine import Engine, build_engine
from pipeline.tasks.base import Task
from pipeline.train import finetune, persist


def _prefix_in(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def build_engines(
    cfg: Config, spec: DataSpec, task: Task, rank: int, world_size: int, resume_from: str | None
) -> tuple[dict[str, Engine], bool]:
    """{engine name: Engine} of `task`, loaded from `resume_from` if given; and whether that load
    went through a universal checkpoint (another world size)."""
    # Same seed on every rank for the initial weights (ZeRO-3 partitions each rank's own copy),
    # then a per-rank seed so dropout masks differ between ranks.
    torch.manual_seed(cfg.seed)
    model = models.build(
        cfg.model.name, cfg.model.args, spec.sample_shape, task.num_outputs(spec.num_classes)
    )
    if not resume_from:  # a resumed fine-tuning run gets its weights from its own checkpoint
        finetune.apply_init(model, cfg.init_from)
    frozen = finetune.freeze(model, cfg.init_from)
    engines: dict[str, Engine] = {}
    loads: dict[str, Any] = {}
    universal = False
    for name, module in task.split(model).items():
        if resume_from:
            loads[name] = persist.prepare_engine_load(resume_from, world_size, name, rank == 0)
            universal = loads[name][2]
        prefix = _prefix_in(model, module)  # frozen names are the whole model's; an engine sees its own
        delayed = [n.removeprefix(f"{prefix}.") for n in frozen if not prefix or n.startswith(f"{prefix}.")]
        engines[name] = build_engine(
            name,
            module,
            optim=cfg.optim_for(name),
            train=cfg.train,
            precision=cfg.precision,
            zero=cfg.zero,
            raw=cfg.deepspeed,
            micro_batch_size=cfg.data.batch_size,
            load_universal=universal,
            lr_mult=cfg.init_from.lr_mult,
            delayed=delayed if cfg.init_from.unfreeze_at_step else None,
            start_step=cfg.init_from.unfreeze_at_step,
        )
    torch.manual_seed(cfg.seed * 100_003 + rank)
    for name, (load_dir, load_tag, _) in loads.items():
        engines[name].load(load_dir, load_tag)
    return engines, universal
