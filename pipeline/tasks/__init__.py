"""Tasks: how a batch becomes losses, updates and metrics (pure torch; no DeepSpeed, no collectives).

A task is given its engines by name (anything callable like the module, with `backward`, `step` and
`module`), and an `agree(loss) -> bool` callable from the loop: a collective that every rank calls
once per backward, true when the loss is finite on every rank (`single_update` calls it, before
backward or overlapped with it, see there). A task calls it the same number of times on every rank
(its decisions are agreed), so collectives stay in step; when it returns false the task returns at
once with `skipped=True` and no further update.

    task.split(model)            -> {engine name: module}    each becomes one DeepSpeed engine
    task.train_step(engines, x, y, step, agree) -> (losses, skipped)
    task.eval_sums(engines, x, y) -> 1-D tensor of sums (all-reduced over batches and ranks)
    task.eval_metrics(sums)      -> {"eval/...": float}
    task.grid(engines, fixed_x)  -> images to show (N, C, H, W) in the data's normalised space, or None
"""

from __future__ import annotations

import difflib
from typing import Any

from pipeline.config import ConfigError
from pipeline.tasks.base import Task
from pipeline.tasks.classify import ClassifyTask
from pipeline.tasks.gan import GanTask
from pipeline.tasks.reconstruct import AutoencoderTask, VaeTask
from pipeline.tasks.sequence import NextStepTask

REGISTRY: dict[str, type[Task]] = {
    "classify": ClassifyTask,
    "next_step": NextStepTask,
    "autoencoder": AutoencoderTask,
    "vae": VaeTask,
    "gan": GanTask,
}


def build(name: str, args: dict[str, Any]) -> Task:
    """The task `task.name` with `task.args`, validated (errors name the key)."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"config key 'task.name': unknown task '{name}'{hint} (known: {', '.join(REGISTRY)})"
        )
    cls = REGISTRY[name]
    for key in args:
        if key not in cls.ARGS:
            close = difflib.get_close_matches(key, cls.ARGS, n=1)
            hint = (
                f"; did you mean 'task.args.{close[0]}'?"
                if close
                else f"; valid: {', '.join(cls.ARGS) or 'none'}"
            )
            raise ConfigError(f"unknown config key 'task.args.{key}' for task '{name}'{hint}")
    try:
        return cls(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key 'task.args': {e}") from e
