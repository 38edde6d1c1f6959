"""World-size change: convert a ZeRO checkpoint to DeepSpeed's universal format, once, and cache it.

ZeRO 1-3 checkpoints hold one optimizer partition per data-parallel rank and refuse to load with
another number of ranks (DeepSpeed#2898). DeepSpeed's `ds_to_universal` rewrites them per parameter;
an engine built with `checkpoint.load_universal=true` then loads them at any world size.
The result goes to `<checkpoints>/.universal/step_XXXXXXXX/<engine>/` (written to a temp name and
renamed, so a crash mid-conversion leaves nothing that looks finished).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from pipeline.checkpoint import trust
from pipeline.checkpoint.commit import ENGINE_TAG, CheckpointError

UNIVERSAL_TAG = f"{ENGINE_TAG}_universal"


def universal_dir(ckpt: Path, engine: str) -> Path:
    """The load dir of the converted engine (load with tag UNIVERSAL_TAG)."""
    return Path(ckpt).parent / ".universal" / Path(ckpt).name / engine


def convert(ckpt: Path, engine: str) -> Path:
    """Convert (if not cached) and return the load dir. Run on one rank; the others wait. The source
    (or the cached conversion) is refused (trust.UnsafeCheckpoint) unless it holds tensors only."""
    target = universal_dir(ckpt, engine)
    if (target / UNIVERSAL_TAG).is_dir():
        trust.check_tree(target)  # a cache beside a checkpoint from elsewhere came from there too
        return target
    source = Path(ckpt) / "engines" / engine / ENGINE_TAG
    trust.check_tree(source)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    env = {**os.environ}
    env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    # --inject_missing_state: plain (non-Megatron) models carry no universal_checkpoint_info.
    # trust.command: every torch.load of the converter (it asks for weights_only=False) reads tensors
    # only, so a checkpoint from elsewhere cannot run code through it; the caller checked its files.
    command = trust.command(
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(source),
        "--output_folder",
        str(tmp / UNIVERSAL_TAG),
        "--inject_missing_state",
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    )
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"converting {source} to a universal checkpoint failed:\n{proc.stderr[-2000:]}")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
