"""The logging arithmetic: losses summed over a log window, sample counters, throughput.

Nothing here syncs per step: losses stay on the device until a log step, when one all-reduce of the
window's sums (and one of the counters) gives every rank the same means and totals.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.data.stream import Batch
from pipeline.training import collectives
from pipeline.training.state import TrainState


class TooManyBadSamples(RuntimeError):
    """data.on_error=skip, and more than data.max_skip_fraction of the data was bad (exit 1)."""


@dataclass
class DataCounters:
    """Good and bad samples since the last sync; synced (collectively) at log steps and saves."""

    max_skip_fraction: float
    train_samples: int  # of the data set: the skip budget is never below its fraction of one epoch
    device: str = "cpu"
    good: int = 0
    bad: list = field(default_factory=list)

    def count(self, batch: Batch) -> None:
        self.bad += batch.bad
        self.good += len(batch.keys)

    def sync(self, state: TrainState, event: Callable[..., None]) -> None:
        """Collective: add every rank's counts to `state`, report bad samples as events, and raise
        TooManyBadSamples past the budget (on every rank alike: all ranks see the same totals)."""
        gathered = collectives.gather_objects([(b.shard, b.key, b.reason) for b in self.bad])
        for shard, key, reason in (b for rank_bad in gathered for b in rank_bad):
            event("skip_sample", step=state.step, shard=shard, key=key, reason=reason)
        good = collectives.all_reduce(torch.tensor([float(self.good)], device=self.device)).item()
        state.samples_seen += int(good)
        state.samples_skipped += sum(len(r) for r in gathered)
        self.good, self.bad = 0, []
        budget = self.max_skip_fraction * max(state.samples_seen + state.samples_skipped, self.train_samples)
        if state.samples_skipped > budget:
            raise TooManyBadSamples(
                f"{state.samples_skipped} bad samples skipped, more than data.max_skip_fraction="
                f"{self.max_skip_fraction} allows ({budget:.0f}); see skip_sample events in events.jsonl"
            )


class Meter:
    """Loss sums and step counts of the current log window, and the window's wall-clock time."""

    def __init__(self, *, samples_per_micro_batch: int, grad_accum: int, wait_s: Callable[[], float]) -> None:
        self.samples_per_micro_batch = samples_per_micro_batch  # batch size x world size
        self.grad_accum = grad_accum
        self.wait_s = wait_s  # the loader's total input wait so far (a clock of its own)
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.restart_clock()

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        """One micro-batch's losses (device tensors: no host sync)."""
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.float()

    def step_done(self) -> None:
        self.steps += 1

    def restart_clock(self) -> None:
        """Start timing afresh: after eval or a save, whose time is not training throughput."""
        self.start_s, self.start_wait_s = time.perf_counter(), self.wait_s()

    def means(self) -> dict[str, float]:
        """Collective: each loss's mean over the window's micro-batches and all ranks. Every rank holds
        the same keys (the tasks' decisions are agreed); none when the whole window was skipped."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        micro_batches = max(1, self.steps * self.grad_accum)
        world = collectives.rank_and_world()[1]
        stacked = collectives.all_reduce(torch.stack([self.sums[k] for k in keys]) / micro_batches)
        return dict(zip(keys, (stacked / world).tolist(), strict=True))

    def window_metrics(self) -> dict[str, Any]:
        """Collective: the train/ metrics of the window, then a new window."""
        elapsed_s = time.perf_counter() - self.start_s
        metrics: dict[str, Any] = {f"train/{k}": v for k, v in self.means().items()}
        metrics["train/samples_per_s"] = (
            self.steps * self.grad_accum * self.samples_per_micro_batch / elapsed_s
        )
        metrics["train/data_wait_frac"] = (self.wait_s() - self.start_wait_s) / elapsed_s
        self.sums, self.steps = {}, 0
        self.restart_clock()
        return metrics
