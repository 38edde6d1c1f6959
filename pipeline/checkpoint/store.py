"""Where a run's checkpoints live: the local commit directory, and optionally a mirror on object storage.

Training always commits locally first (commit.py: atomic rename on a local or shared filesystem); with
`checkpoint.dir: s3://...` rank 0 then uploads each commit in the background (MANIFEST last, see
remote.py) and applies the same retention there. Resuming takes the newest commit that verifies from
either side; a remote one is downloaded into the local directory first, which makes it a local commit.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from secrets import token_hex
from typing import Any

from pipeline.checkpoint import commit
from pipeline.checkpoint.remote import RemoteStore, is_remote
from pipeline.files import fsync_dir, sha256_file

CORRUPT_REMOTE = "corrupt-remote.json"


class Store:
    def __init__(self, local: Path, remote_url: str | None = None, storage_options: dict | None = None):
        self.local = Path(local)
        self.remote = RemoteStore(remote_url, storage_options) if remote_url else None
        self._uploader: ThreadPoolExecutor | None = None
        self._uploads: list[tuple[Path, Future]] = []

    def describe(self) -> str:
        return f"{self.local}" + (f", mirrored to {self.remote.url}" if self.remote else "")

    def has_commits(self) -> bool:
        return bool(commit.committed(self.local)) or bool(self.remote and self.remote.committed())

    def remove_debris(self) -> None:
        """Rank 0, before any save of this run: partial local saves and partial uploads."""
        commit.remove_debris(self.local)
        if self.remote:
            self.remote.remove_debris()

    def newest_verified(self, warn: Callable[[str], None], set_aside: bool = False) -> Path | None:
        """The newest commit whose files verify, local or remote (downloaded into the local dir); a bad
        one is skipped with a warning naming the bad file, falling back to the previous commit. With
        `set_aside` (the run itself, rank 0, holding the run's lock; never the preflight), a local
        commit that fails verification is renamed `corrupt-step_X-<time>` (set_aside_corrupt)."""
        local = {c.name: c for c in commit.committed(self.local)}
        remote = set(self.remote.committed()) if self.remote else set()
        for name in sorted(set(local) | remote, reverse=True):
            if name in local:
                try:
                    commit.verify(local[name])
                    return local[name]
                except commit.CheckpointError as e:
                    aside = f"; set aside as {set_aside_corrupt(local[name]).name}" if set_aside else ""
                    warn(f"skipping checkpoint {name}: {e}{aside}")
            if name in remote:
                assert self.remote is not None
                try:
                    return self.remote.download(name, self.local)
                except commit.CheckpointError as e:
                    if set_aside:  # no rename in a bucket: listed instead, never counted by retention
                        self._corrupt_remote(add=name)
                    warn(f"skipping checkpoint {self.remote.url}/{name}: {e}")
        return None

    def _corrupt_remote(self, add: str | None = None, drop: str | None = None) -> set[str]:
        """Remote commits that failed verification at a start (`CORRUPT_REMOTE` in the local dir):
        retention never counts them, so they never make it delete a valid commit."""
        path = self.local / CORRUPT_REMOTE
        try:
            names = set(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            names = set()
        changed = (add is not None and add not in names) or (drop is not None and drop in names)
        names = (names | {add} if add else names) - {drop}
        if changed:
            self.local.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(sorted(names)) + "\n")
        return names

    def publish(self, ckpt: Path, retention: commit.Retention) -> None:
        """Rank 0, after a local commit: upload it in the background, then apply retention on both sides."""
        if self.remote is None:
            return
        if self._uploader is None:
            self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-upload")
        self._uploads.append((ckpt, self._uploader.submit(self._upload, ckpt, retention)))

    def _upload(self, ckpt: Path, retention: commit.Retention) -> str:
        assert self.remote is not None
        try:
            url = self.remote.upload(ckpt)
            corrupt = self._corrupt_remote(drop=ckpt.name)  # a re-upload of that name replaced it
            names = [name for name in self.remote.committed() if name not in corrupt]
            for name in commit.not_retained(names, self.remote.read_manifest, retention):
                self.remote.remove(name)
        finally:  # local retention after the upload, so it never deletes a commit being uploaded
            commit.apply_retention(self.local, retention)
        return url

    def finished_uploads(self, wait: bool = False) -> list[tuple[Path, str | None, str | None]]:
        """Uploads that ended since the last call: (local commit, remote URL or None, error or None)."""
        ended, still = [], []
        for ckpt, future in self._uploads:
            if wait or future.done():
                error = future.exception()
                ended.append((ckpt, None if error else future.result(), error and str(error)))
            else:
                still.append((ckpt, future))
        self._uploads = still
        return ended


def for_config(cfg: Any) -> Store:
    return Store(cfg.checkpoint_dir, cfg.checkpoint_remote, cfg.checkpoint.storage_options)


def resolve_path(target: str, store: Store) -> Path | None:
    """A checkpoint the user named (`resume=PATH`): a local checkpoint or run dir, or a remote commit
    (`s3://.../step_X`) or remote checkpoints prefix, downloaded into the store's local dir and
    verified. None if there is nothing committed there."""
    if not is_remote(target):
        return commit.find(Path(target))
    parent, _, name = target.rstrip("/").rpartition("/")
    if name.startswith("step_"):
        source = RemoteStore(parent, store.remote.storage_options if store.remote else None)
        return source.download(name, store.local)
    source = RemoteStore(target, store.remote.storage_options if store.remote else None)
    names = source.committed()
    return source.download(names[-1], store.local) if names else None


# --- what a checkpoint belongs to ---------------------------------------------------------------------

# The config keys that define the training a checkpoint continues (dotted prefixes of Config.to_dict()):
# resuming with another value would silently continue other weights, optimizer or data stream. All
# other keys may change on resume: train.max_steps (train longer), cluster.* (another world size),
# tracking.*, checkpoint.*, resume, run_dir/name, data paths and loader settings, eval/log intervals,
# precision (auto resolves per machine; DeepSpeed refuses a state it cannot load). An allow-list, so a
# key added later never refuses old checkpoints by accident.
DEFINING_KEYS = (
    "seed",
    "model",
    "task.name",
    "task.args",
    "task.optim",
    "optim",
    "zero",
    "deepspeed",
    "train.grad_accum",
    "train.clip_grad_norm",
    "data.batch_size",
    "data.shuffle_buffer",
    "data.augment",
    "data.image_size",
    "data.fields",
    "data.decode",
    "init_from.exclude",
    "init_from.freeze",
    "init_from.unfreeze_at_step",
    "init_from.lr_mult",
    "init_from.adapt_input_channels",
    "init_from.freeze_batchnorm",
)
# keys under DEFINING_KEYS that change how a step is computed, not what: the same losses with or
# without, so a run may turn them on when it resumes (e.g. to fit in memory on other hardware)
HOW_NOT_WHAT = ("model.activation_checkpointing",)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted not in ("model.args", "task.args", "deepspeed"):
            flat |= _flatten(value, f"{dotted}.")
        else:
            flat[dotted] = value
    return flat


def training_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """{dotted key: value} of the keys that define the training (DEFINING_KEYS), from Config.to_dict():
    stored in every MANIFEST as `training_config`, compared when a run resumes."""
    flat = _flatten(config_dict)
    return {
        k: v
        for k, v in sorted(flat.items())
        if any(k == d or k.startswith(f"{d}.") for d in DEFINING_KEYS) and k not in HOW_NOT_WHAT
    }


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for every defining key whose value differs (keys one side lacks, e.g.
    added by a newer version of the pipeline, are not compared)."""
    return [
        f"{k}: {saved[k]!r} -> {current[k]!r}"
        for k in sorted(saved)
        if k in current and saved[k] != current[k]
    ]


# --- setting commits aside -----------------------------------------------------------------------------


def _stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def set_aside_corrupt(ckpt: Path) -> Path:
    """Rename a commit that failed verification to `corrupt-<name>-<time>` beside it: no longer a
    `step_*` commit, so it is never resumed from, never counted as newest by retention, and never makes
    retention delete a valid one; its files stay for inspection (delete it yourself)."""
    aside = ckpt.parent / f"corrupt-{ckpt.name}-{_stamp()}"
    os.rename(ckpt, aside)
    fsync_dir(ckpt.parent)
    return aside


# --- resume=PATH: loads exactly that commit, and continues the run from there -------------------------
#
# A rollback (resume=PATH with newer commits in this checkpoint dir) moves the newer commits to
# `abandoned-<time>/` beside them, where nothing resumes from or deletes them (the user does, once
# sure), and records itself in `rollback.json`: re-running the same command (a Slurm requeue, a re-run
# after exit 75) then continues the rolled-back line instead of rolling back again, and a restart
# before the line's first commit still resumes from PATH. The new line gets a new tracking run id
# (W&B cannot rewrite steps it already has; the tracker sets the old line's metrics aside).

ROLLBACK_RECORD = "rollback.json"


@dataclass
class ResumeTarget:
    """What `resume=PATH` means for this start (resume_target; applied by apply_resume_target)."""

    commit: Path  # the commit this start resumes from
    step: int  # the step of the commit PATH names
    manifest_sha256: str  # identifies that commit (also when it lies outside this checkpoint dir)
    newer: list[str] = field(default_factory=list)  # local commits past `step`: set aside at start
    applied: bool = False  # an earlier start applied this resume=PATH: continue its line


def _manifest_sha256(ckpt: Path) -> str:
    return sha256_file(Path(ckpt) / commit.MANIFEST)


def _name_step(name: str) -> int:
    return int(name.removeprefix("step_"))


def read_rollback(local: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((Path(local) / ROLLBACK_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def continue_line(where: Store, newest: Path | None) -> Path | None:
    """`newest` (the newest verified commit), unless an applied rollback's own commit is newer: a run
    rolled back to a commit outside this dir that has not committed since resumes from that commit."""
    record = read_rollback(where.local)
    if not record or not record.get("commit"):
        return newest
    target = Path(record["commit"])
    if newest is not None and commit.read_manifest(newest)["step"] >= record.get("step", 0):
        return newest
    try:
        if _manifest_sha256(target) == record.get("manifest_sha256"):
            commit.verify(target)
            return target
    except (OSError, commit.CheckpointError):
        pass
    return newest


def resume_target(where: Store, target: Path, warn: Callable[[str], None]) -> ResumeTarget:
    """Read-only (the preflight): where a start with `resume=PATH` (the verified commit `target`)
    resumes from, and which newer local commits it sets aside. CheckpointError when the remote mirror
    holds newer commits (an object store has no rename: the user removes them there)."""
    step = commit.read_manifest(target)["step"]
    digest = _manifest_sha256(target)
    record = read_rollback(where.local)
    if record and record.get("manifest_sha256") == digest:  # a restart of a run that already applied it
        newest = where.newest_verified(warn)
        ahead = newest is not None and commit.read_manifest(newest)["step"] > step
        return ResumeTarget(newest if ahead else target, step, digest, applied=True)  # type: ignore[arg-type]
    newer = [c.name for c in commit.committed(where.local) if _name_step(c.name) > step and c != target]
    if where.remote is not None:
        remote_newer = [n for n in where.remote.committed() if _name_step(n) > step]
        if remote_newer:
            raise commit.CheckpointError(
                f"resume={target} rolls back to step {step}, but {where.remote.url} holds newer commits "
                f"({', '.join(remote_newer)}) that a later resume would pick: move or delete them there "
                "first (an object store cannot rename them aside), or resume=auto to continue them"
            )
    return ResumeTarget(target, step, digest, newer=newer)


def apply_resume_target(where: Store, target: ResumeTarget, source: str) -> dict[str, Any] | None:
    """The driver, holding the run's lock, before any worker starts: set the newer commits aside and
    record this resume=PATH (rollback.json). Returns the record (None for a restart of an applied one)."""
    if target.applied:
        return None
    moved_to = None
    if target.newer:
        moved_to = where.local / f"abandoned-{_stamp()}"
        moved_to.mkdir()
        for name in target.newer:
            os.rename(where.local / name, moved_to / name)
        fsync_dir(where.local)
    record = {
        "resume": source,
        "commit": str(Path(target.commit).resolve()),
        "step": target.step,
        "manifest_sha256": target.manifest_sha256,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "abandoned": target.newer,
        "moved_to": str(moved_to) if moved_to else None,
        # a new line, a new tracking run: W&B cannot take steps it already has again
        "run_id": token_hex(4) if target.newer else None,
    }
    where.local.mkdir(parents=True, exist_ok=True)
    tmp = where.local / f".{ROLLBACK_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, where.local / ROLLBACK_RECORD)
    return record


def line_run_id(local: Path, resume_from: Path) -> str | None:
    """The tracking run id of a rolled-back line when resuming from its rollback commit itself (its own
    trainer state still names the abandoned line's run); None otherwise."""
    record = read_rollback(local)
    if not record or not record.get("run_id"):
        return None
    try:
        return record["run_id"] if _manifest_sha256(resume_from) == record.get("manifest_sha256") else None
    except OSError:
        return None
