"""The checkpoint commit protocol.

    checkpoints/step_00000100/
        engines/<name>/...        DeepSpeed save dir of each engine (tag "state"; ZeRO partitions per rank)
        trainer_state.json        the TrainState
        MANIFEST.json             written last: every file's size and hash, the model and ZeRO layout

Every rank writes its part into `.tmp-step_XXXXXXXX` (in the background: `start` returns once the tensors
are staged in memory, see writer.py); once all have (`finish`: every rank's hashes gathered), rank 0
writes the MANIFEST, fsyncs and renames the directory to `step_XXXXXXXX`. A directory named `step_*`
with a verifying MANIFEST is therefore complete; anything else is debris from an interrupted save,
never loaded. A re-save of a committed step moves the old commit to `.old-step_X` until the new one is
renamed into place (remove_debris puts it back if the process dies in between); retention renames a
commit to `.deleting-step_X` before removing it. Each of these points is a fault-injection crash point
(training/faults.py COMMIT_POINTS), tested to resume from the last good commit.

Each MANIFEST file entry is {"bytes": N, "xxh3_128": hex} (commits before issue 19: {"bytes": N,
"sha256": hex}; `verify` checks either). The hash guards against corruption (a flipped bit, a torn or
truncated write, a bad upload), not forgery: whoever hands us a checkpoint writes its MANIFEST too, so
no hash in it could prove trust. Trust is the tensors-only loader (trust.py), which holds for any file.
So a fast non-cryptographic hash is enough, and sha256 (~1.2-1.45 GB/s on one core, the limit of a
save on 2 cores) buys nothing more; xxh3_128 runs at ~11 GB/s.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.checkpoint.writer import HASH, BackgroundWriter
from pipeline.config import ConfigError
from pipeline.files import confined, fsync_dir, fsync_file, fsync_tree, plain, sha256_file, xxh3_128_file

MANIFEST = "MANIFEST.json"
STATE_FILE = "trainer_state.json"
ENGINE_TAG = "state"
FORMAT = "pipeline-checkpoint/1"
# The small files rank 0 writes itself during a save (ours, and what DeepSpeed's save_checkpoint writes
# on global rank 0 only: the tag pointer and its recovery scripts), complete when `start` returns. Any
# other file without a writer's record is hashed and fsynced by `finish`, as before.
RANK0_SMALL_FILES = frozenset({STATE_FILE, "latest", "zero_to_fp32.py", "zero_to_torch.py"})
# The content hashes a MANIFEST entry may carry, by field name: new commits write HASH, older ones have
# "sha256". Still format /1: readers before issue 19 refuse a new entry (no "sha256") as corrupt.
HASHES: dict[str, Callable[[Path], str]] = {HASH: xxh3_128_file, "sha256": sha256_file}


class CheckpointError(ConfigError):
    """A checkpoint that is missing, incomplete or corrupt (exit 2 when the user named it)."""


class SavesItself(Protocol):
    name: str

    def save(self, directory: Path, tag: str, writer: Any = None) -> None: ...


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class SaveFailed(RuntimeError):
    """The checkpoint was not committed (disk full, I/O error, non-finite weights); nothing old was lost."""


@dataclass
class PendingSave:
    """A save whose files are being written in the background; `finish` commits it."""

    step: int
    tmp: Path
    final: Path
    engine_names: list[str]
    metadata: dict[str, Any]
    error: BaseException | None = None  # this rank's error before its writes were queued


def start(
    engines: Iterable[SavesItself],
    state: dict[str, Any],
    root: Path,
    step: int,
    *,
    is_rank0: bool,
    all_ok: Callable[[bool], bool],
    writer: BackgroundWriter,
    metadata: dict[str, Any],
    before_commit: Callable[[], None] | None = None,
) -> PendingSave:
    """Collective: all ranks call it. Returns once every tensor is staged in memory (the training loop
    may go on changing its weights); `writer` writes the files into `.tmp-step_X` in the background.
    Raises SaveFailed on every rank when the directory cannot be created."""
    root = Path(root)
    tmp = root / f".tmp-{step_dir_name(step)}"
    error: BaseException | None = None
    try:
        if is_rank0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # debris of an interrupted save of the same step
            tmp.mkdir()
    except OSError as e:
        error = e
    if not all_ok(error is None):  # also: the directory exists before any rank writes into it
        if is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise SaveFailed(f"cannot create {tmp}: {error or 'failed on another rank'}")
    pending = PendingSave(step, tmp, root / step_dir_name(step), [], metadata)
    writer.begin(tmp)
    try:
        try:
            if is_rank0:
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
            for engine in engines:
                engine.save(tmp / "engines" / engine.name, ENGINE_TAG, writer)
                pending.engine_names.append(engine.name)
            if is_rank0:  # hashed and fsynced in the background instead of in `finish`
                writer.seal([p for p in sorted(tmp.rglob("*")) if p.name in RANK0_SMALL_FILES])
        finally:
            writer.start_writes()  # only now: writes beside the staging copies slow them (writer.py)
        if before_commit is not None:
            before_commit()
    except OSError as e:
        pending.error = e
    return pending


def finish(
    pending: PendingSave,
    *,
    is_rank0: bool,
    all_ok: Callable[[bool], bool],
    gather: Callable[[Any], list[Any]],
    writer: BackgroundWriter,
    retention: Retention | None,
    crash_point: Callable[[str], None] | None = None,
) -> Path:
    """Collective: waits for this rank's background writes, then rank 0 writes the MANIFEST (every
    rank's hashes, gathered), fsyncs and renames. Returns the committed directory, or raises SaveFailed
    on every rank after removing the partial write. Earlier commits are untouched either way: the
    rename is the only commit. `crash_point(name)` is called at each step of the protocol (fault
    injection: training/faults.py COMMIT_POINTS)."""
    point = crash_point or (lambda name: None)
    records, error = writer.wait()
    error = pending.error or error
    gathered = gather(({k: (r.bytes, r.digest) for k, r in records.items()}, error and str(error)))
    errors = [e for _, e in gathered if e]
    tmp, final = pending.tmp, pending.final
    if errors:  # every rank sees the same list: all raise together, none waits in a collective
        if is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise SaveFailed(f"writing checkpoint step {pending.step} failed: {errors[0]}")
    error = None
    try:
        if is_rank0:
            hashed = {k: v for rank_records, _ in gathered for k, v in rank_records.items()}
            manifest = {
                "format": FORMAT,
                "step": pending.step,
                "engines": pending.engine_names,
                "engine_tag": ENGINE_TAG,
                **pending.metadata,
                "files": _file_table(tmp, hashed),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if set(manifest["files"]) <= set(hashed):
                # every file and its directory entry were fsynced by the writers (and rank 0's seal):
                # only the MANIFEST and its entry are new
                fsync_file(tmp / MANIFEST)
                fsync_dir(tmp)
            else:  # files nobody hashed (read by _file_table just now): fsync them and every directory
                fsync_tree(tmp, skip={tmp / k for k in hashed})
            point("after_manifest")
            old = final.parent / f"{OLD_PREFIX}{final.name}"
            if final.exists():  # the same step saved again: the old commit moves aside, never deleted
                shutil.rmtree(old, ignore_errors=True)  # before the new one is in place (remove_debris
                os.rename(final, old)  # puts it back if we die before the rename below)
                point("after_old_aside")
            os.rename(tmp, final)
            point("after_rename")
            fsync_dir(final.parent)
            shutil.rmtree(old, ignore_errors=True)
            if retention is not None:  # None: the caller applies it (after an upload, say)
                # deletes run off the loop
                writer.later(apply_retention, final.parent, retention, crash_point)
    except OSError as e:
        error = e
    if not all_ok(error is None):  # nobody proceeds (or exits) before the commit is visible
        if is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise SaveFailed(f"committing checkpoint step {pending.step} failed: {error or 'failed on rank 0'}")
    return final


def _file_table(root: Path, hashed: dict[str, tuple[int, str]]) -> dict[str, dict[str, Any]]:
    """Every file's size and HASH: from the writers where they hashed it, else read now (the state
    file and small metadata files DeepSpeed writes itself)."""
    table = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = str(p.relative_to(root))
            size, digest = hashed[rel] if rel in hashed else (p.stat().st_size, HASHES[HASH](p))
            table[rel] = {"bytes": size, HASH: digest}
    return table


# A commit replaced by a re-save of its step, between the two renames; and a commit retention is deleting.
OLD_PREFIX, DELETING_PREFIX = ".old-", ".deleting-"


def remove_debris(root: Path) -> list[Path]:
    """Delete `.tmp-step_*` directories left by saves that died before their commit and `.deleting-*`
    ones left by an interrupted retention; put back a `.old-step_X` whose replacement never got renamed
    into place (else delete it)."""
    root = Path(root)
    if not root.is_dir():
        return []
    for old in sorted(root.glob(f"{OLD_PREFIX}step_*")):
        final = root / old.name.removeprefix(OLD_PREFIX)
        if not final.exists() and (old / MANIFEST).is_file():
            os.rename(old, final)  # the re-save died between the renames: the old commit stands
    debris = sorted(
        [*root.glob(".tmp-step_*"), *root.glob(f"{DELETING_PREFIX}step_*"), *root.glob(f"{OLD_PREFIX}step_*")]
    )
    for path in debris:
        shutil.rmtree(path, ignore_errors=True)
    return debris


def committed(root: Path) -> list[Path]:
    """Committed checkpoint dirs (with a MANIFEST), oldest first. Verification is separate."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / MANIFEST).is_file())


@dataclass(frozen=True)
class Retention:
    """Keep the newest `keep_last` commits, plus the `keep_best` best by `metric` (read from each
    MANIFEST's `metrics`; `mode` max or min)."""

    keep_last: int
    keep_best: int = 0
    metric: str = "eval/accuracy"
    mode: str = "max"


def find(target: Path) -> Path | None:
    """`target` if it is a committed checkpoint, else the newest commit of a run dir (its checkpoints/)
    or of a checkpoints dir; None if there is none. Verification is separate."""
    target = Path(target)
    if (target / MANIFEST).is_file():
        return target
    found = committed(target / "checkpoints") or committed(target)
    return found[-1] if found else None


def apply_retention(
    root: Path, retention: Retention, crash_point: Callable[[str], None] | None = None
) -> list[Path]:
    """Delete commits that retention does not keep; returns the deleted ones. Each is renamed to
    `.deleting-step_X` first (one atomic step), so an interrupted delete leaves debris, never a
    `step_X` with a MANIFEST and half its files."""
    root = Path(root)
    names = [c.name for c in committed(root)]
    deleted = [
        root / name for name in not_retained(names, lambda name: read_manifest(root / name), retention)
    ]
    for ckpt in deleted:
        doomed = root / f"{DELETING_PREFIX}{ckpt.name}"
        shutil.rmtree(doomed, ignore_errors=True)
        os.rename(ckpt, doomed)
        if crash_point is not None:
            crash_point("in_retention")
        shutil.rmtree(doomed, ignore_errors=True)
    return deleted


def not_retained(names: list[str], manifest_of: Callable[[Any], dict], retention: Retention) -> list[str]:
    """Which of the commits `names` (oldest first) retention deletes. `manifest_of(name)` reads a
    MANIFEST (only called when keep_best is set), so local dirs and remote stores share the rule."""
    keep = set(names[-retention.keep_last :])
    if retention.keep_best:
        keep |= set(ranked(names, manifest_of, retention.metric, retention.mode)[: retention.keep_best])
    return [name for name in names if name not in keep]


def ranked(names: list[str], manifest_of: Callable[[Any], dict], metric: str, mode: str) -> list[str]:
    """The commits that recorded `metric` in their MANIFEST, best first (`mode` max or min)."""
    scored = []
    for name in names:
        try:
            value = manifest_of(name).get("metrics", {}).get(metric)
        except CheckpointError:  # unreadable: never ranked (and never the reason a good one goes)
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            scored.append((value if mode == "max" else -value, name))
    return [name for _, name in sorted(scored, key=lambda t: t[0], reverse=True)]


def best(root: Path, metric: str, mode: str) -> Path | None:
    """The committed checkpoint under `root` with the best `metric` (None if none recorded it)."""
    root = Path(root)
    names = ranked([c.name for c in committed(root)], lambda name: read_manifest(root / name), metric, mode)
    return root / names[0] if names else None


def read_manifest(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{ckpt} is not a committed checkpoint: {MANIFEST} is missing")
    return parse_manifest(path.read_bytes(), str(path))


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """A checkpoint MANIFEST's bytes (from a local dir or a bucket), checked before anything is read or
    written by its names: a JSON object of our format whose file, engine and tag names are plain relative
    paths (files.plain; `verify` adds the symlink check on disk). Whoever supplies a checkpoint writes its
    MANIFEST too, so its hashes prove integrity, never where its files may go."""
    try:
        manifest = json.loads(data)
    except ValueError as e:  # also bytes that are not UTF-8
        raise CheckpointError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{where}: unknown format {found!r}, expected {FORMAT!r}")
    step, table = manifest.get("step"), manifest.get("files")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{where}: 'step' must be a step number, not {step!r}")
    if not isinstance(table, dict):
        raise CheckpointError(f"{where}: 'files' must be an object of file name -> {{bytes, {HASH}}}")
    for rel, entry in table.items():
        plain(rel, where=where, error=CheckpointError)
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int):
            raise CheckpointError(f"{where}: entry {rel!r} needs 'bytes' (int)")
        if not any(isinstance(entry.get(name), str) for name in HASHES):
            raise CheckpointError(
                f"{where}: file {rel!r} has no known content hash (one of {', '.join(HASHES)}); refused, "
                "as it could not be verified"
            )
    # engines/<engine>/<tag>/ are directories the loaders open by these names: one component each
    engines = manifest.get("engines", [])
    if not isinstance(engines, list):
        raise CheckpointError(f"{where}: 'engines' must be a list of names, not {engines!r}")
    for name in [*engines, manifest.get("engine_tag", ENGINE_TAG)]:
        if "/" in plain(name, where=where, error=CheckpointError):
            raise CheckpointError(f"{where}: engine or tag name {name!r} must be one path component")
    return manifest


def verify(ckpt: Path) -> dict[str, Any]:
    """Check every file against the MANIFEST; raise CheckpointError naming the first bad file (or a name
    that leads outside `ckpt`, also through a symlink)."""
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    where = str(ckpt / MANIFEST)
    for rel, expected in manifest["files"].items():
        path = confined(ckpt, rel, where=where, error=CheckpointError)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt}: file {rel} is missing")
        if path.stat().st_size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint {ckpt}: file {rel} has {path.stat().st_size} bytes, expected {expected['bytes']}"
            )
        for name, digest_of in HASHES.items():  # every hash the entry has (parse_manifest: at least one)
            if name in expected and digest_of(path) != expected[name]:
                raise CheckpointError(f"checkpoint {ckpt}: file {rel} does not match its {name} (corrupt)")
    return manifest


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / STATE_FILE).read_text())
