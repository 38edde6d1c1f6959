"""Activation checkpointing (`model.activation_checkpointing`): the named blocks keep only their inputs in
the forward and recompute their activations in the backward, trading compute for memory.

    false                     off
    true                      the model's own blocks: `CHECKPOINT_BLOCKS` of its class (ResNets: every
                              residual block, `layer*.*`; LSTM/GRU: the recurrent layers, `rnn`)
    [pattern, ...]            the modules whose qualified names match (fnmatch: `encoder.*`, `blocks.3`);
                              a module inside another matched one is covered by it

A block is checkpointed by giving that one module object a subclass whose `__call__` runs the usual
`nn.Module.__call__` under `torch.utils.checkpoint` (non-reentrant): its parameters, names and
state_dict stay as they were (checkpoints and `pipeline export` see the same model), and the
module's own hooks run again in the recomputation, which is where ZeRO-3 gathers its parameters.
Dropout draws the same masks in the recomputation (the RNG state is replayed), and BatchNorm layers
inside a block do not update their running statistics a second time (momentum 0 while recomputing),
so the losses are the same with and without it (a test compares them bitwise).
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import ConfigError

KEY = "model.activation_checkpointing"


def blocks(model: nn.Module, setting: bool | list[str]) -> list[str]:
    """The qualified names of the modules `setting` checkpoints (outermost only). ConfigError naming
    the key: `true` for a model without CHECKPOINT_BLOCKS, a pattern that matches no module."""
    if setting is False or setting == []:
        return []
    patterns = list(getattr(model, "CHECKPOINT_BLOCKS", ())) if setting is True else list(setting)
    names = [name for name, _ in model.named_modules() if name]
    if not patterns:
        children = ", ".join(name for name, _ in model.named_children())
        raise ConfigError(
            f"config key '{KEY}': model {type(model).__name__} names no blocks of its own "
            f"(CHECKPOINT_BLOCKS); give patterns of module names instead, e.g. [{children.split(', ')[0]}] "
            f"(its top-level modules: {children})"
        )
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            close = difflib.get_close_matches(pattern, names, n=3)
            hint = f"; close: {', '.join(close)}" if close else f"; its top-level modules: {_children(model)}"
            raise ConfigError(f"config key '{KEY}': pattern '{pattern}' matches no module of the model{hint}")
    matched = [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    return [name for name in matched if not any(name.startswith(f"{outer}.") for outer in matched)]


def _children(model: nn.Module) -> str:
    return ", ".join(name for name, _ in model.named_children())


def apply(model: nn.Module, setting: bool | list[str]) -> list[str]:
    """Checkpoint the blocks `setting` names in place; returns their names."""
    chosen = blocks(model, setting)
    for name in chosen:
        _checkpoint_module(model.get_submodule(name))
    return chosen


_CLASSES: dict[type, type] = {}  # one checkpointed subclass per module class


def _checkpoint_module(module: nn.Module) -> None:
    cls = type(module)
    if getattr(cls, "_pipeline_checkpointed", False):
        return
    if cls not in _CLASSES:
        _CLASSES[cls] = type(
            f"Checkpointed{cls.__name__}",
            (cls,),
            {"__call__": _checkpointed_call, "_pipeline_checkpointed": True, "__module__": cls.__module__},
        )
    module.__class__ = _CLASSES[cls]


def _checkpointed_call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    if not (torch.is_grad_enabled() and self.training):  # eval and no_grad store nothing: nothing to save
        return nn.Module.__call__(self, *args, **kwargs)
    if torch.compiler.is_compiling():
        # Under train.compile the recomputation is part of the compiled backward graph, which replays
        # the block's operations but not its buffer updates (BatchNorm statistics change once, in the
        # forward); dynamo cannot trace a context_fn anyway.
        return checkpoint(nn.Module.__call__, self, *args, use_reentrant=False, **kwargs)
    return checkpoint(
        nn.Module.__call__,
        self,
        *args,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _statistics_held(self)),
        **kwargs,
    )


@contextlib.contextmanager
def _statistics_held(block: nn.Module) -> Iterator[None]:
    """While a block is recomputed: its BatchNorm layers normalise as before but leave their running
    statistics alone (they were updated in the forward)."""
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    saved = [
        (m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
        for m in norms
    ]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
