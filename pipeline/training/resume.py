"""Where a run starts from: the agreed resume point, each engine's load location (a universal
conversion at another world size), this launch's restart count, and the RNG states of every rank.
Everything here is collective unless it says so."""

from __future__ import annotations

import base64
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpoint import commit, store, universal
from pipeline.config import Config
from pipeline.training import collectives


def agree_resume_point(cfg: Config, given: str | None, is_rank0: bool) -> str | None:
    """The checkpoint every rank resumes from. The launcher's choice (`given`, checked before launch)
    unless this run dir has a newer commit: after Ray restarts the worker group, the newest verified
    commit is the right one. Rank 0 decides (verification reads files), everyone follows."""
    choice = given
    if is_rank0:
        # a commit that fails verification is set aside (corrupt-step_X-<time>): never counted as
        # newest by retention, so it cannot make retention delete this run's valid commits
        where = store.for_config(cfg)
        newest = store.continue_line(
            where, where.newest_verified(warn=lambda m: print(f"warning: {m}", flush=True), set_aside=True)
        )
        if newest is not None and (given is None or _step_of(newest) > _step_of(Path(given))):
            choice = str(newest)
    return collectives.broadcast_object(choice)


def _step_of(ckpt: Path) -> int:
    return int(commit.read_manifest(ckpt)["step"])


def prepare_engine_load(
    resume_from: str | None, world_size: int, engine: str, is_rank0: bool
) -> tuple[Path, str, bool]:
    """Where the engine loads from: the checkpoint itself, or (another world size under ZeRO 1-3) its
    universal conversion, made once by rank 0 and cached. Returns (load dir, tag, universal?)."""
    assert resume_from is not None
    ckpt = Path(resume_from)
    manifest = commit.read_manifest(ckpt)
    if manifest["world_size"] == world_size or manifest["zero_stage"] == 0:
        return ckpt / "engines" / engine, commit.ENGINE_TAG, False
    error = None
    if is_rank0:
        try:
            universal.convert(ckpt, engine)
        except commit.CheckpointError as e:
            error = str(e)
    error = collectives.broadcast_object(error)  # also: nobody loads before the conversion is complete
    if error:
        raise commit.CheckpointError(error)
    return universal.universal_dir(ckpt, engine), universal.UNIVERSAL_TAG, True


def rng_state() -> dict[str, Any]:
    """This rank's RNG states (torch CPU/CUDA, Python, NumPy), JSON-able."""
    state: dict[str, Any] = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(
        torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy())
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(
            torch.from_numpy(np.frombuffer(base64.b64decode(state["cuda"]), dtype=np.uint8).copy())
        )
    random.setstate(_tupled(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def restart_count(run_dir: Path, launch_id: str, is_rank0: bool) -> int:
    """How many times this launch's workers have started before (Ray restarts them after a failure)."""
    attempt = 0
    if is_rank0 and launch_id:
        marker = run_dir / ".launches" / launch_id
        attempt = int(marker.read_text()) + 1 if marker.exists() else 0
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(attempt))
    return collectives.broadcast_object(attempt)
