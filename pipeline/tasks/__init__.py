"""Tasks: how a batch becomes losses, updates and metrics (pure torch; no DeepSpeed, no collectives
of their own). The protocol is `pipeline.tasks.base` (`Task`, `Step`), public as `pipeline.Task`;
this module resolves `task.name` (a built-in name or a user's import path) and `task.args`."""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from pipeline import imports
from pipeline.config import ConfigError
from pipeline.tasks.base import Task
from pipeline.tasks.classify import ClassifyTask
from pipeline.tasks.gan import GanTask
from pipeline.tasks.language import LanguageModelTask
from pipeline.tasks.ppo import PpoTask
from pipeline.tasks.reconstruct import AutoencoderTask, VaeTask
from pipeline.tasks.sequence import NextStepTask

REGISTRY: dict[str, type[Task]] = {
    "classify": ClassifyTask,
    "next_step": NextStepTask,
    "autoencoder": AutoencoderTask,
    "vae": VaeTask,
    "gan": GanTask,
    "ppo": PpoTask,
    "language_model": LanguageModelTask,
}

# What a task class must define beyond the base class (the base raises NotImplementedError).
_REQUIRED = ("train_step", "eval_sums", "eval_metrics")


def task_class(name: str) -> type[Task]:
    """The class `task.name` names: a built-in task, or a `pipeline.Task` subclass by import path,
    checked against the protocol (ConfigError naming the key otherwise)."""
    if imports.is_import_path(name):
        cls = imports.load_class(name, key="task.name", base=Task, what="pipeline.Task")
        check_protocol(cls, where=f"config key 'task.name': '{name}'")
        return cls
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"config key 'task.name': unknown task '{name}'{hint} (known: {', '.join(REGISTRY)}; "
            "or your own pipeline.Task subclass as 'package.module:Class' or 'path/to/file.py:Class')"
        )
    return REGISTRY[name]


def check_protocol(cls: type[Task], *, where: str) -> None:
    """What the loop relies on, checked before any worker starts."""
    if cls.source not in ("shards", "environment"):
        raise ConfigError(f"{where}: source must be 'shards' or 'environment', got {cls.source!r}")
    # an environment task's evaluation runs episodes with act(), not eval_sums over val batches
    required = ("train_step", "act", "eval_metrics") if cls.source == "environment" else _REQUIRED
    missing = [m for m in required if getattr(cls, m) is getattr(Task, m)]
    if missing:
        raise ConfigError(f"{where} does not define {', '.join(missing)} (see pipeline.Task)")
    engines = cls.ENGINES
    if not engines or not isinstance(engines, tuple) or not all(isinstance(e, str) for e in engines):
        raise ConfigError(f"{where}: ENGINES must be a non-empty tuple of engine names, got {engines!r}")
    if not isinstance(cls.EVAL_SUMS, int) or cls.EVAL_SUMS < 1:
        raise ConfigError(f"{where}: EVAL_SUMS must be the (positive) length of eval_sums' vector")
    if cls.best_mode not in ("max", "min"):
        raise ConfigError(f"{where}: best_mode must be 'max' or 'min', got {cls.best_mode!r}")


def _accepted_args(cls: type[Task]) -> list[str] | None:
    """The constructor's keyword parameters; None when it takes **kwargs (anything goes)."""
    if cls.__init__ is object.__init__:  # no constructor of its own: no arguments
        return []
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds]


def build(name: str, args: dict[str, Any]) -> Task:
    """The task `task.name` with `task.args` (its constructor's keyword arguments), validated: errors
    name the key."""
    cls = task_class(name)
    accepted = _accepted_args(cls)
    for key in args if accepted is not None else ():
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = (
                f"; did you mean 'task.args.{close[0]}'?"
                if close
                else f"; valid: {', '.join(accepted) or 'none'}"
            )
            raise ConfigError(f"unknown config key 'task.args.{key}' for task '{name}'{hint}")
    try:
        return cls(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key 'task.args': {e}") from e
    except Exception as e:  # a user's constructor may raise anything: still a config problem
        raise ConfigError(
            f"config key 'task.args': {cls.__name__}(**{args}) raised {type(e).__name__}: {e}"
        ) from e


def best_of(task: Task | type[Task], metric: str | None, mode: str | None) -> tuple[str, str]:
    """(metric, mode) that `checkpoint.keep_best` and `Result.best` rank by: `checkpoint.best_metric`
    where set, else the task's own `best_metric`; `checkpoint.best_mode` where set, else the task's
    mode for its own metric and max for another."""
    chosen = metric or task.best_metric
    return chosen, mode or (task.best_mode if chosen == task.best_metric else "max")


def eval_metric_names(task: Task, *, scored: bool = False) -> list[str] | None:
    """The eval/ metrics `task` logs (its `eval_metrics` on a vector of ones: pure arithmetic), plus
    eval/digit_score when generated samples are scored (`task.score_classifier`); None when the
    task cannot tell without data (its eval_metrics raised)."""
    import torch

    try:
        names = list(task.eval_metrics(torch.ones(task.EVAL_SUMS)))
    except Exception:
        return None
    return sorted(set(names) | ({"eval/digit_score"} if scored else set()))
