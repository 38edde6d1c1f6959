"""One run at a time per run dir (and per local checkpoint dir): an exclusive lock held by the driver.

Two runs on one run dir (a local run plus a Slurm job, two `submit slurm`s) would delete each other's
in-progress saves (`.tmp-step_*` debris removal) and commits (retention). The driver takes
`fcntl.flock(LOCK_EX | LOCK_NB)` on `<dir>/.lock` before it writes anything there and holds it until
it exits; the kernel releases a flock when its holder dies (SIGKILL, OOM, a node reboot of a local
disk), so a crash never leaves a stale lock, and a Slurm requeue (a new process after the old one
exited) or a re-run simply takes it again. The lock file holds who has it (pid, host, start time,
command), which the refused run names. The descriptor is not inherited (Python opens files
close-on-exec), so Ray's processes or the local launcher's workers never keep a dead driver's lock.

flock works on local filesystems and on NFSv4/Lustre where the client maps it to a POSIX lock; on a
filesystem without locks the lock is refused with an error naming it (never silently skipped).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from pipeline import secrets
from pipeline.config import ConfigError

LOCK_FILE = ".lock"


class RunLocked(ConfigError):
    """Another live process holds the lock of this run dir or checkpoint dir (exit 2)."""


def _holder_text(path: Path) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "another process (it has not written its name yet)"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')} "
        f"(command: {holder.get('command')})"
    )


def _acquire(directory: Path, what: str) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, secrets.PRIVATE_FILE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunLocked(
                f"{what} {directory} is in use by another run: {_holder_text(path)}. Two runs on one "
                f"{what} would delete each other's checkpoints: wait for that run to end (or stop it), "
                "or give this run another run_dir (or checkpoint.dir)"
            ) from None
        raise ConfigError(
            f"cannot lock {what} {directory} ({path}: {e}); use a filesystem with locks"
        ) from None
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": secrets.scrub(shlex.join(sys.argv)),  # an override may carry a credential
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return fd


@contextlib.contextmanager
def hold(run_dir: Path, checkpoint_dir: Path | None = None) -> Iterator[None]:
    """Hold the run dir's lock (and the checkpoint dir's, when it is a local dir outside the run dir)
    for the duration of the block; RunLocked naming the holder if another process has either."""
    run_dir = Path(run_dir).resolve()
    dirs = [(run_dir, "run dir")]
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir).resolve()
        if not checkpoint_dir.is_relative_to(run_dir):
            dirs.append((checkpoint_dir, "checkpoint dir"))
    fds: list[int] = []
    try:
        for directory, what in dirs:
            fds.append(_acquire(directory, what))
        yield
    finally:
        for fd in reversed(fds):  # the file stays: deleting a lock file races with the next taker
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the last descriptor releases the flock
