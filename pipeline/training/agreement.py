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

from pipeline.training import collectives
from pipeline.training.faults import Faults


class Flags(NamedTuple):
    """What the ranks last agreed on (each true if it holds on any rank)."""

    nonfinite: bool
    stop: bool
    writes_busy: bool


class DivergedUpdates(RuntimeError):
    """The ranks' tasks called `Step.update` differently (count, engine or order): a task bug."""


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

    def _local(self, loss: torch.Tensor, update: int, engine: int) -> torch.Tensor:
        bad = (~torch.isfinite(loss.detach())).any().float()
        if self.faults.nan_loss(self.step, self.micro):
            bad = torch.ones_like(bad)
        # (update, engine) and their negatives: one max-reduce gives both the max and the min over
        # ranks, so a task that updates differently on different ranks is caught in the same
        # all-reduce, before ZeRO's collectives pair up wrongly (a hang, or silently mixed gradients).
        tags = [update, -update, engine, -engine]
        return torch.stack(
            [
                bad,
                bad.new_tensor(float(self.stop_requested())),
                bad.new_tensor(float(self.writes_busy())),
                *(bad.new_tensor(float(t)) for t in tags),
            ]
        )

    def start(self, loss: torch.Tensor, *, update: int = 0, engine: int = -1) -> Callable[[], bool]:
        """Start the all-reduce; the returned function waits and is True when every loss was finite.
        `update`/`engine` identify the task's update (0/-1: none, a micro-batch without updates)."""
        wait = collectives.all_reduce_async(self._local(loss, update, engine), "max")

        def agreed() -> bool:
            values = wait().tolist()
            self.flags = Flags(*(bool(v) for v in values[:3]))
            max_update, min_update, max_engine, min_engine = values[3], -values[4], values[5], -values[6]
            if max_update != min_update or max_engine != min_engine:
                raise DivergedUpdates(
                    f"step {self.step}, micro-batch {self.micro}: the ranks' tasks disagree on their "
                    f"updates (update #{int(min_update)}-#{int(max_update)}, engine index "
                    f"{int(min_engine)}-{int(max_engine)}; -1/#0: no update). Task.train_step must call "
                    "step.update the same number of times, for the same engines in the same order, on "
                    "every rank: decide on agreed values only (step.skipped, update's result)"
                )
            return not self.flags.nonfinite

        return agreed

    def refresh(self) -> Flags:
        """Agree without a loss (a micro-batch whose task updated nothing): stop and writes only."""
        self.start(torch.zeros(()))()
        return self.flags
