"""pipeline: fault-tolerant distributed training with Ray Train, DeepSpeed ZeRO and WebDataset.

The public Python API (pipeline/api.py; the CLI is a layer over it):

    import pipeline

    result = pipeline.train("configs/smoke.yaml", train={"max_steps": 50})
    result.metrics, result.best, result.checkpoint     # see pipeline.Result

    train, load_config, Result, evaluate, export        the API
    ConfigError, TrainingFailed, Preempted              its errors (the CLI's exits 2, 1 and 75)
    Task, Step                                          the protocol of your own tasks (tasks/base.py)

Importing the package is cheap: every name above is imported on first use, and heavy frameworks
are imported inside the module that owns them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_EXPORTS = {
    "train": "pipeline.api",
    "load_config": "pipeline.api",
    "Result": "pipeline.api",
    "Best": "pipeline.api",
    "evaluate": "pipeline.api",
    "export": "pipeline.api",
    "Preempted": "pipeline.api",
    "ConfigError": "pipeline.config",
    "TrainingFailed": "pipeline.launch.plan",
    "Task": "pipeline.tasks.base",
    "Step": "pipeline.tasks.base",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
