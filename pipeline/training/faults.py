"""Fault injection for chaos drills and the fault-tolerance tests: `PIPELINE_FAULTS` in the environment.

    PIPELINE_FAULTS="kill@7:1,nan@12,crash_in_save@20,enospc@30"

Each entry is KIND@STEP[.MICRO][:RANK] (RANK defaults to 0; MICRO, for nan only, picks one
micro-batch of a step with train.grad_accum > 1, counted from 0; without it every micro-batch):
    kill           SIGKILL this worker process at the start of step STEP (once per run dir)
    hang           stop this worker at the start of step STEP (sleeps): the others' collectives time out
    nan            make the loss of step STEP non-finite (every time the step is reached)
    crash_in_save  SIGKILL inside the checkpoint write of step STEP, before the commit (once)
    enospc         raise OSError(ENOSPC) while committing the checkpoint of step STEP (once)
    raise          raise InjectedFault (a RuntimeError) at the start of step STEP (once per run dir)
    raise_always   the same, every time the step is reached: the run fails on every attempt
    crash_after_manifest   SIGKILL rank 0 in the commit of step STEP: MANIFEST written, not renamed (once)
    crash_after_old_aside  ... a commit of the same step moved aside, the new one not renamed yet (once)
    crash_after_rename     ... renamed to step_X, before the directory fsync and retention (once)
    crash_in_retention     ... while retention deletes an old commit (renamed, not yet removed) (once)
Faults marked "once" leave a marker in <run_dir>/.faults/, so a restarted run does not repeat them.
Unset (the default), nothing here does anything.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

KINDS = {"kill", "hang", "nan", "crash_in_save", "enospc"}
ONCE = {"kill", "hang", "crash_in_save", "enospc"}
# An exception in the training code, not a dead process: what the launcher reports as the root cause.
KINDS |= {"raise", "raise_always"}
ONCE |= {"raise"}


# Points of the commit protocol (checkpoint/commit.py) where rank 0 can be killed: each must resume
# from the last good commit.
COMMIT_POINTS = ("after_manifest", "after_old_aside", "after_rename", "in_retention")
KINDS |= {f"crash_{point}" for point in COMMIT_POINTS}
ONCE |= {f"crash_{point}" for point in COMMIT_POINTS}


class InjectedFault(RuntimeError):
    """What the `raise` and `raise_always` faults throw."""


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int
    micro: int | None = None


def parse(text: str) -> list[Fault]:
    faults = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        kind, _, where = entry.partition("@")
        where, _, rank = where.partition(":")
        step, _, micro = where.partition(".")
        if (
            kind not in KINDS
            or not step.isdigit()
            or (rank and not rank.isdigit())
            or (micro and (not micro.isdigit() or kind != "nan"))
        ):
            raise ValueError(
                f"PIPELINE_FAULTS entry {entry!r}: expected KIND@STEP[.MICRO][:RANK], KIND in "
                f"{sorted(KINDS)} (MICRO for nan only)"
            )
        faults.append(Fault(kind, int(step), int(rank or 0), int(micro) if micro else None))
    return faults


class Faults:
    def __init__(self, run_dir: Path, rank: int) -> None:
        self.rank = rank
        self.marker_dir = run_dir / ".faults"
        self.faults = [f for f in parse(os.environ.get("PIPELINE_FAULTS", "")) if f.rank == rank]

    def _fires(self, kind: str, step: int, micro: int = 0) -> bool:
        for fault in self.faults:
            if fault.kind == kind and fault.step == step and fault.micro in (None, micro):
                if kind not in ONCE:
                    return True
                marker = self.marker_dir / f"{kind}-{step}-{self.rank}"
                if marker.exists():
                    return False
                self.marker_dir.mkdir(parents=True, exist_ok=True)
                marker.touch()
                return True
        return False

    def at_step_start(self, step: int) -> None:
        if self._fires("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._fires("hang", step):
            time.sleep(24 * 3600)
        self._raise_at(step)

    def _raise_at(self, step: int) -> None:
        if self._fires("raise", step) or self._fires("raise_always", step):
            raise InjectedFault(f"injected by PIPELINE_FAULTS at step {step} on rank {self.rank}")

    def nan_loss(self, step: int, micro: int = 0) -> bool:
        return self._fires("nan", step, micro)

    def in_commit(self, step: int, point: str) -> None:
        """Called by the commit of step `step` at each of COMMIT_POINTS (rank 0 only reaches them)."""
        assert point in COMMIT_POINTS, point
        if self._fires(f"crash_{point}", step):
            os.kill(os.getpid(), signal.SIGKILL)

    def in_save(self, step: int) -> None:
        """Called by rank `rank` after its part of the checkpoint is written, before the commit."""
        if self._fires("crash_in_save", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._fires("enospc", step):
            raise OSError(errno.ENOSPC, "No space left on device (injected by PIPELINE_FAULTS)")
