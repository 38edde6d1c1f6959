"""Export a committed checkpoint to consolidated fp32 weights that load without DeepSpeed.

FILE        torch.save(state_dict): `model.load_state_dict(torch.load(FILE, weights_only=True), strict=True)`
FILE.json   what built the model: registry name, args, input shape, classes, source checkpoint
FILE.policy.pt2  (an environment task's run, e.g. PPO) the deterministic policy as a self-contained
            torch.export program, observations -> actions, that loads with plain torch:
            `torch.export.load(FILE.policy.pt2).module()(obs)` (policy.py); FILE.json's `policy`
            names its input, output and environment

Every file of the checkpoint is read with tensors only (trust.py): a checkpoint from elsewhere whose
files would need arbitrary unpickling is refused (exit 2), naming the file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import policy, trust
from pipeline.checkpoint.commit import CheckpointError, verify


def consolidated_state_dict(ckpt: Path, engine: str = "model") -> dict[str, torch.Tensor]:
    """Gather the full fp32 weights (+ buffers) of one engine from a ZeRO 0-3 checkpoint."""
    manifest = verify(ckpt)
    if engine not in manifest["engines"]:
        raise CheckpointError(f"checkpoint {ckpt} has no engine '{engine}' (it has {manifest['engines']})")
    ds_dir = Path(ckpt) / "engines" / engine
    tag = manifest["engine_tag"]
    trust.check_tree(ds_dir)  # the MANIFEST proves integrity, not trust: tensors only, else refused
    if manifest["zero_stage"] == 0:
        # Without ZeRO, the model-states file holds the whole module (fp32 master weights with autocast).
        state_dict = trust.load(ds_dir / tag / "mp_rank_00_model_states.pt")["module"]
    else:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # ZeRO 1-3 partition the fp32 master weights over ranks: DeepSpeed's reader merges them. It
        # asks torch.load for weights_only=False: tensors_only overrides that (also for a file that
        # changed since the check).
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with trust.tensors_only(ds_dir):
            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def export(ckpt: Path, out: Path, engine: str = "model") -> dict[str, Any]:
    """FILE (+ FILE.json, + FILE.policy.pt2 for an environment task): see the module docstring."""
    state_dict = consolidated_state_dict(ckpt, engine)
    manifest = verify(ckpt)
    program = None
    if manifest.get("model", {}).get("action_space"):  # an environment task: its policy as a program
        weights = {name: consolidated_state_dict(ckpt, name) for name in manifest["engines"]}
        program = policy.load_policy(ckpt, weights)
    meta = {
        "format": "pipeline-weights/1",
        "engine": engine,
        "checkpoint": str(Path(ckpt).resolve()),
        "step": manifest["step"],
        "model": manifest.get("model", {}),
        "data": manifest.get("data", {}),
        "precision": manifest.get("precision"),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an existing export is never half-overwritten.
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(state_dict, tmp)
    os.replace(tmp, out)
    if program is not None:
        path = out.with_name(out.name + policy.SUFFIX)
        try:
            policy.export_policy(program, meta["model"]["input_shape"], path)
            meta["policy"] = policy.describe(meta["model"], manifest.get("env"), path)
        except Exception as e:  # a user's task whose act() cannot be traced: the weights still stand
            print(
                f"warning: no {path.name}: torch.export could not trace the task's act(): {e}",
                file=sys.stderr,
            )
            meta["policy"] = {"error": f"torch.export failed: {e}"}
    sidecar = out.with_name(out.name + ".json")
    sidecar.write_text(json.dumps(meta, indent=2) + "\n")
    return meta
