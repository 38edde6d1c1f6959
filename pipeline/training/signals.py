"""Preemption requests: SIGTERM/SIGUSR1 to this process, or a STOP file the driver writes.

Slurm (`--signal=B:USR1@lead`, `scancel --signal`), Kubernetes and `kill` signal the driver; the driver
cannot reach into Ray's worker processes, so it writes `<run_dir>/STOP` and every worker checks it once
per step (a stat call). Workers that receive the signal themselves (local launcher, Slurm signalling
every task) set the same flag. The loop then agrees on it across ranks, commits and exits 75.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

STOP_FILE = "STOP"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, run_dir: Path) -> None:
        self.stop_file = run_dir / STOP_FILE
        self.signalled: int | None = None
        if threading.current_thread() is threading.main_thread():  # Ray runs train_fn in a thread
            for sig in SIGNALS:
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signalled = signum

    def requested(self) -> bool:
        return self.signalled is not None or self.stop_file.exists()


def request_stop(run_dir: Path) -> None:
    """Ask every worker of the run in `run_dir` to checkpoint and stop (driver side)."""
    (run_dir / STOP_FILE).touch()


def clear(run_dir: Path) -> None:
    (run_dir / STOP_FILE).unlink(missing_ok=True)
