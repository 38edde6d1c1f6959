"""Tasks: how a batch becomes losses, updates and metrics (pure torch; no DeepSpeed, no collectives
of their own). The protocol is `pipeline.tasks.base` (`Task`, `Step`); this module is the registry."""

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
