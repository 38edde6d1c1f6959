"""The task interface (see tasks/__init__.py) and the single-engine default parts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn


class Agree(Protocol):
    """The loop's per-backward collective (see tasks/__init__.py)."""

    def __call__(self, loss: torch.Tensor) -> bool:
        """Blocking: true when `loss` is finite on every rank (and no fault says otherwise)."""
        ...

    def start(self, loss: torch.Tensor) -> Callable[[], bool]:
        """The same agreement started in the background: call the result for the answer."""
        ...


class Task:
    """Defaults for a single-engine task named "model"."""

    ARGS: tuple[str, ...] = ()  # accepted task.args keys (constructor keyword arguments)
    EVAL_SUMS = 0  # length of the eval_sums vector
    ENGINES: tuple[str, ...] = ("model",)
    best_metric = "eval/accuracy"
    best_mode = "max"
    needs_labels = True

    def normalization(self, mean: list[float], std: list[float]) -> tuple[list[float], list[float]]:
        """The per-channel (mean, std) inputs are normalised with: the data's by default."""
        return mean, std

    def num_outputs(self, num_classes: int) -> int:
        """The `num_classes` the model is built with: the data's classes for a task that uses labels,
        else 0 (for a sequence model: predict the input's own features)."""
        return num_classes if self.needs_labels else 0

    def split(self, model: nn.Module) -> dict[str, nn.Module]:
        return {"model": model}

    def train_step(
        self, engines: dict[str, Any], x: torch.Tensor, y: torch.Tensor, step: int, agree: Agree
    ) -> tuple[dict[str, torch.Tensor], bool]:
        raise NotImplementedError

    def eval_sums(self, engines: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def eval_dummy(self, engines: dict[str, Any], x: torch.Tensor) -> None:
        """A forward that every engine's parameters take part in (a rank without val data runs it so
        ZeRO-3's parameter all-gathers stay matched across ranks)."""
        with torch.no_grad():
            for engine in engines.values():
                engine(x)

    def eval_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    def grid(self, engines: dict[str, Any], fixed_x: torch.Tensor) -> torch.Tensor | None:
        return None


def single_update(engine: Any, loss: torch.Tensor, agree: Agree) -> bool:
    """Backward + step of one engine if every rank's loss is finite; False if skipped (no update).

    Where the engine can throw a backward's gradients away (`can_discard_grads`: ZeRO-0 without
    accumulation) the agreement's all-reduce runs during backward and a skip discards the gradients:
    a blocking all-reduce before backward would be a second lock-step point per step, and waiting
    there cost 2-3.6 ms of a 50-60 ms CNN step on 2 cores. Elsewhere (ZeRO-1/2/3 keep reduced gradient
    partitions inside DeepSpeed; with accumulation the other micro-batches' gradients are kept) it
    is agreed before backward."""
    if getattr(engine, "can_discard_grads", False):
        agreed = agree.start(loss)
        engine.backward(loss)  # every rank runs it (a non-finite loss too): the collectives stay matched
        if not agreed():
            engine.discard_grads()
            return False
    else:
        if not agree(loss):
            return False
        engine.backward(loss)
    engine.step()  # DeepSpeed updates on the gradient-accumulation boundary only
    return True
