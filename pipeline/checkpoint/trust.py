"""Checkpoint files are pickles, and unpickling can run any code: load tensors only.

Whoever hands us a checkpoint directory also writes its MANIFEST, so its hashes prove integrity, not
trust. Every checkpoint file is therefore read with torch's restricted unpickler (`weights_only`),
which builds tensors, containers and numbers and nothing else, plus the few DeepSpeed types its
checkpoints hold (ALLOWED, each with the reason it is needed). Two layers:

- `check_tree(dir)`, before a directory is handed to any loader: every file in it that a loader could
  unpickle must load with that unpickler, else UnsafeCheckpoint (exit 2) names the file and the types.
  The check builds inert stand-ins for the allowed DeepSpeed types, so it runs none of their code, and
  maps tensor data (mmap) instead of reading it: it costs a read of each file's small pickle.
- `tensors_only()`, around every load (DeepSpeed's `load_checkpoint`, `zero_to_fp32`, `ds_to_universal`
  in its subprocess): forces `weights_only=True` on every `torch.load` in the process, also those that
  ask for `weights_only=False` (TORCH_FORCE_WEIGHTS_ONLY_LOAD), so a file swapped after the check (or a
  loader we did not know of) still cannot run code. This holds for our own run's checkpoints too.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import runpy
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint.commit import CheckpointError

# Globals beyond torch's own weights_only defaults (tensors, storages, dtypes, torch.Size,
# OrderedDict, ...) that DeepSpeed writes into its checkpoint files. Found by listing the globals of
# real ZeRO 0-3 checkpoints (fp32, bf16, optimizer and parameter offload, SGD and Adam) and of their
# universal conversions. Each is a plain value holder whose construction runs no other code.
ALLOWED = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": (
        "ZeRO 1-3 optimizer states (*_optim_states.pt) keep the optimizer's static loss scaler (scale 1 "
        "for fp32 and bf16); the universal conversion copies it"
    ),
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": (
        "the same for precision=fp16 (GPU), whose optimizer keeps a dynamic loss scaler"
    ),
    "deepspeed.runtime.zero.config.ZeroStageEnum": (
        "ZeRO 1-3 optimizer states record their stage (an int enum)"
    ),
    "deepspeed.utils.tensor_fragment.fragment_address": (
        "ZeRO 1-2 optimizer states map each parameter to its slice of the flat partition (a dataclass "
        "of numel and start)"
    ),
}

# Files no loader unpickles: JSON metadata, DeepSpeed's `latest` tag files, and the scripts DeepSpeed
# copies into every save dir (zero_to_fp32.py, zero_to_torch.py: a user may run them; we never do).
# Every other file is checked, whatever its name: torch.load reads any file it is given.
INERT_NAMES = {"latest", "latest_universal"}
INERT_SUFFIXES = {".json", ".py"}
FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_UNSAFE = re.compile(r"GLOBAL (\S+) was not an allowed global")


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file that needs more than tensors to load (its unpickling could run code)."""


def check_tree(root: Path) -> None:
    """Every file under `root` that a loader could unpickle loads tensors only; else UnsafeCheckpoint."""
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and path.name not in INERT_NAMES and path.suffix not in INERT_SUFFIXES:
            check_file(path)


def check_file(path: Path) -> None:
    """Load `path` with the restricted unpickler and inert stand-ins for ALLOWED (nothing of DeepSpeed's
    runs); UnsafeCheckpoint names the file and the types it would need."""
    path = Path(path)
    is_zip = _is_zip(path)
    with torch.serialization.safe_globals([(_Inert, name) for name in ALLOWED]):
        if is_zip:  # names every offending type at once (the load below stops at the first)
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            except Exception:  # not a torch zip: the load below says why
                unsafe = []
            if unsafe:
                raise refused(path, f"GLOBAL {' GLOBAL '.join(sorted(unsafe))} was not an allowed global")
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        except Exception as e:  # torch raises many kinds for files it cannot parse
            raise refused(path, e) from None


def load(path: Path) -> Any:
    """`torch.load` of one checkpoint file, tensors and ALLOWED types only (check_file it first for a
    message that names the types)."""
    try:
        needed = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if n in ALLOWED]
    except Exception:  # not a torch zip: the load refuses it or needs none of them
        needed = list(ALLOWED)
    # only the types the file names: a file without DeepSpeed's types loads without importing DeepSpeed
    with torch.serialization.safe_globals(_allowed_types(needed)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise refused(Path(path), e) from None


@contextlib.contextmanager
def tensors_only(*where: Path) -> Iterator[None]:
    """Every `torch.load` in this process (any thread) inside the block unpickles tensors and ALLOWED
    types only, whatever `weights_only` its caller passes. A refusal is an UnsafeCheckpoint, naming the
    file when it lies under one of the dirs `where` (torch's error does not name it)."""
    before = {key: os.environ.pop(key, None) for key in (FORCE, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ[FORCE] = "1"
    try:
        with torch.serialization.safe_globals(_allowed_types()):
            yield
    except pickle.UnpicklingError as e:
        for root in where:
            check_tree(root)  # finds and names the file (only on this failure path)
        raise refused(None, e) from None
    finally:
        for key, value in before.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def command(module: str, *args: str) -> list[str]:
    """The command line that runs `python -m module args` with every load tensors-only (ds_to_universal)."""
    return [sys.executable, "-m", "pipeline.checkpoint.trust", module, *args]


def _allowed_types(names: Iterable[str] = ALLOWED) -> list[Any]:
    """The real ALLOWED classes (of `names`), for loads that use what they build: imports DeepSpeed
    (which the loaders inside tensors_only have imported already). One missing in this DeepSpeed
    version is simply not allowed."""
    found = []
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            found.append((getattr(importlib.import_module(module), attr), name))
        except (ImportError, AttributeError):
            continue
    return found


class _Inert:
    """Stands in for an ALLOWED type while checking: accepts any arguments and state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def refused(path: Path | None, error: BaseException | str) -> UnsafeCheckpoint:
    """The refusal of `path` (None: a file DeepSpeed was loading) for torch's `error`, naming the types
    it needs where torch names them. Never torch's advice to retry with weights_only=False."""
    what = f"checkpoint file {path}" if path is not None else "a checkpoint file"
    types = _UNSAFE.findall(str(error))
    if types:
        problem = f"needs {', '.join(types)} to load, which is not a tensor type we allow"
    else:
        parts = [p.strip() for p in str(error).split("\n\n") if p.strip()]
        detail = parts[-2] if len(parts) >= 3 else (parts[0] if parts else type(error).__name__)
        problem = f"does not load as tensors only ({detail[:300]})"
    return UnsafeCheckpoint(
        f"{what} {problem}: unpickling it could run code, so it is refused. Use checkpoints this "
        f"pipeline wrote (their files hold tensors and only these other types: {', '.join(ALLOWED)})"
    )


if __name__ == "__main__":  # `python -m pipeline.checkpoint.trust MODULE ARGS`: see command()
    module_name, sys.argv = sys.argv[1], sys.argv[1:]
    with tensors_only():
        runpy.run_module(module_name, run_name="__main__", alter_sys=True)
