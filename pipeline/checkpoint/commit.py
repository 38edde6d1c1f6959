"""The checkpoint commit protocol.

    checkpoints/step_00000100/
        engines/<name>/...        DeepSpeed save dir of each engine (tag "state"; ZeRO partitions per rank)
        trainer_state.json        the TrainState
        MANIFEST.json             written last: every file's size and sha256, the model and ZeRO layout

Every rank writes its part into `.tmp-step_XXXXXXXX`; once all have (barrier), rank 0 hashes, fsyncs and
renames the directory to `step_XXXXXXXX`. A directory named `step_*` with a verifying MANIFEST is
therefore complete; anything else is debris from an interrupted save, never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.config import ConfigError
from pipeline.files import fsync_dir, fsync_tree, sha256_file

MANIFEST = "MANIFEST.json"
STATE_FILE = "trainer_state.json"
ENGINE_TAG = "state"
FORMAT = "pipeline-checkpoint/1"


class CheckpointError(ConfigError):
    """A checkpoint that is missing, incomplete or corrupt (exit 2 when the user named it)."""


class SavesItself(Protocol):
    name: str

    def save(self, directory: Path, tag: str, client_state: dict[str, Any] | None = None) -> None: ...


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _file_table(root: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


class SaveFailed(RuntimeError):
    """The checkpoint was not committed (disk full, I/O error, non-finite weights); nothing old was lost."""


def save(
    engines: Iterable[SavesItself],
    state: dict[str, Any],
    root: Path,
    step: int,
    *,
    is_rank0: bool,
    all_ok: Callable[[bool], bool],
    metadata: dict[str, Any],
    retention: Retention,
    before_commit: Callable[[], None] | None = None,
) -> Path:
    """Collective: all ranks call it. Returns the committed directory, or raises SaveFailed on every
    rank (they agree through `all_ok`, an all-reduce of each rank's success) after removing the
    partial write. Earlier commits are untouched either way: the rename is the only commit."""
    root = Path(root)
    tmp = root / f".tmp-{step_dir_name(step)}"
    final = root / step_dir_name(step)
    error: BaseException | None = None

    def phase_ok() -> bool:
        ok = all_ok(error is None)
        if not ok and is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        return ok

    try:
        if is_rank0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # debris of an interrupted save of the same step
            tmp.mkdir()
    except OSError as e:
        error = e
    if not phase_ok():  # also: the directory exists before any rank writes into it
        raise SaveFailed(f"cannot create {tmp}: {error or 'failed on another rank'}")
    engine_names = []
    try:
        for engine in engines:
            engine.save(tmp / "engines" / engine.name, ENGINE_TAG)
            engine_names.append(engine.name)
        if before_commit is not None:
            before_commit()
    except OSError as e:
        error = e
    if not phase_ok():  # every rank's partitions are written before rank 0 hashes and commits
        raise SaveFailed(f"writing checkpoint step {step} failed: {error or 'failed on another rank'}")
    try:
        if is_rank0:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
            manifest = {
                "format": FORMAT,
                "step": step,
                "engines": engine_names,
                "engine_tag": ENGINE_TAG,
                **metadata,
                "files": _file_table(tmp),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            fsync_tree(tmp)
            if final.exists():  # the same step saved again (e.g. a final save right after a periodic one)
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(root)
            apply_retention(root, retention)
    except OSError as e:
        error = e
    if not phase_ok():  # nobody proceeds (or exits) before the commit is visible
        raise SaveFailed(f"committing checkpoint step {step} failed: {error or 'failed on another rank'}")
    return final


def remove_debris(root: Path) -> list[Path]:
    """Delete `.tmp-step_*` directories left by saves that died before their commit."""
    debris = sorted(Path(root).glob(".tmp-step_*")) if Path(root).is_dir() else []
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


def apply_retention(root: Path, retention: Retention) -> list[Path]:
    """Delete commits that retention does not keep; returns the deleted ones."""
    found = committed(root)
    keep = set(found[-retention.keep_last :])
    if retention.keep_best:
        scored = []
        for ckpt in found:
            value = read_manifest(ckpt).get("metrics", {}).get(retention.metric)
            if value is not None:
                scored.append((value if retention.mode == "max" else -value, ckpt))
        keep |= {ckpt for _, ckpt in sorted(scored, key=lambda t: t[0], reverse=True)[: retention.keep_best]}
    deleted = [ckpt for ckpt in found if ckpt not in keep]
    for ckpt in deleted:
        shutil.rmtree(ckpt, ignore_errors=True)
    return deleted


def read_manifest(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{ckpt} is not a committed checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown format {manifest.get('format')!r}")
    return manifest


def verify(ckpt: Path) -> dict[str, Any]:
    """Check every file against the MANIFEST; raise CheckpointError naming the first bad file."""
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    for rel, expected in manifest["files"].items():
        path = ckpt / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt}: file {rel} is missing")
        if path.stat().st_size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint {ckpt}: file {rel} has {path.stat().st_size} bytes, expected {expected['bytes']}"
            )
        if sha256_file(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt}: file {rel} does not match its sha256 (corrupt)")
    return manifest


def newest_verified(root: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest committed checkpoint whose files verify; a bad one is skipped with a warning naming
    the bad file, falling back to the previous commit."""
    for ckpt in reversed(committed(root)):
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as e:
            warn(f"skipping checkpoint {ckpt.name}: {e}")
    return None


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / STATE_FILE).read_text())
