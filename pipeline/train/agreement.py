"""The per-update agreement: one tiny all-reduce that every rank reaches once per `Step.update`.

It is the step's only host sync, and it carries three decisions every rank must take together:
skip a non-finite loss (a rank that stepped alone would deadlock ZeRO's collectives), stop for a
preemption at the same step, and know when every rank's background checkpoint writes are done (then
the commit, itself collective, cannot block).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from pipeline.train import collectives
from pipeline.train.faults import Faults


class Flags(NamedTuple):
    """What the ranks last agreed on (each true if it holds on any rank)."""

    nonfinite: bool
    stop: bool
    writes_busy: bool


class Agreement:
    """`start(loss)` all-reduces (loss non-finite, stop requested, writes busy) with max; `flags`
    holds the last agreed values. `at(step, micro)` tells it where the loop is (for injected faults)."""

    def __init__(
        self, *, faults: Faults, stop_requested: Callable[[], bool], writes_busy: Callable[[], bool]
    ) -> None:
        self.faults = faults
        self.stop_requested, self.writes_busy = stop_requested, writes_busy
        self.step, self.micro = 0, 0
        self.flags = Flags(nonfinite=False, stop=False, writes_busy=False)

    def at(self, step: int, micro: int) -> None:
        self.step, self.micro = step, micro

    def _local(self, loss: torch.Tensor) -> torch.Tensor:
        bad = (~torch.isfinite(loss.detach())).any().float()
        if self.faults.nan_loss(self.step, self.micro):
            bad = torch.ones_like(bad)
        return torch.stack(
            [bad, bad.new_tensor(float(self.stop_requested())), bad.new_tensor(float(self.writes_busy()))]
        )

    def start(self, loss: torch.Tensor) -> Callable[[], bool]:
        """Start the all-reduce; the returned function waits and is True when every loss was finite."""
        wait = collectives.all_reduce_async(self._local(loss), "max")

        def agreed() -> bool:
            self.flags = Flags(*(bool(v) for v in wait().tolist()))
            return not self.flags.nonfinite

        return agreed

    def refresh(self) -> Flags:
        """Agree without a loss (a micro-batch whose task updated nothing): stop and writes only."""
        self.start(torch.zeros(()))()
        return self.flags
