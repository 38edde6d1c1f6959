"""Load weights from outside a run, safely: `init_from` for fine-tuning.

A checkpoint dir of this pipeline is verified against its MANIFEST (integrity), then every file in it
is read with tensors only (trust.py: whoever supplies the dir writes its MANIFEST too); safetensors
files hold no code; any other file is read with `torch.load(weights_only=True)`. So a file that needs
arbitrary unpickling (which can run code) is refused, never executed, also inside a checkpoint dir.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from pipeline.checkpoint.commit import CheckpointError, find
from pipeline.checkpoint.export import consolidated_state_dict


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} state dict from a checkpoint dir, run dir, .safetensors or torch file."""
    source = Path(path)
    if source.is_dir():
        ckpt = find(source)
        if ckpt is None:
            raise CheckpointError(f"init_from: {source} holds no committed checkpoint")
        return consolidated_state_dict(ckpt)  # verifies every file's hash, then tensors only
    if not source.is_file():
        raise CheckpointError(f"init_from: {source} does not exist")
    if source.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(source))
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"init_from: {source} needs arbitrary unpickling to load (it may run code), which we refuse. "
            "Save its state_dict as .safetensors, or with torch.save(model.state_dict())"
        ) from e
    except (RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(f"init_from: cannot read {source}: {e}") from e
    for key in ("state_dict", "model"):  # common wrappers around a state dict
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"init_from: {source} does not hold a state dict of tensors")
    return loaded
