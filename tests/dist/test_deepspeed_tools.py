"""DeepSpeed's own tools work on our checkpoints as DeepSpeed documents them.

Each engine's DeepSpeed save dir, `checkpoints/step_N/engines/<engine>/` (the one holding `latest`
and the tag dir `state/`), ships DeepSpeed's `zero_to_fp32.py`. Run from inside that dir as
`python zero_to_fp32.py . OUTPUT_DIR` it writes OUTPUT_DIR/pytorch_model.bin: the same tensors as
`pipeline export` (it needs `huggingface_hub`, a dependency of ours for that reason).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pipeline import config, launch
from pipeline.checkpoint import commit, export
from pipeline.launch.plan import make_plan

pytestmark = pytest.mark.dist


@pytest.mark.timeout(300)
def test_zero_to_fp32_gives_the_weights_pipeline_export_gives(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    cfg = config.load(
        "configs/smoke.yaml",
        [
            f"data.train={digits_dir}",
            f"run_dir={run_dir}",
            "model.args={channels: [4, 8]}",
            "zero.stage=3",
            "precision=fp32",
            "cluster.launcher=local",
            "optim.warmup_steps=0",
            "train.max_steps=3",
            "train.eval_every=0",
        ],
    )
    launch.train(make_plan(cfg))
    (ckpt,) = commit.committed(run_dir / "checkpoints")
    ds_dir = ckpt / "engines" / "model"
    assert (ds_dir / "latest").read_text().strip() == commit.ENGINE_TAG
    assert (ds_dir / "zero_to_fp32.py").is_file()

    out = tmp_path / "fp32"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}  # as a user on a CPU-only machine would
    proc = subprocess.run(
        [sys.executable, "zero_to_fp32.py", ".", str(out)],
        cwd=ds_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)

    exported = tmp_path / "model.pt"
    export.export(ckpt, exported)
    ours = torch.load(exported, map_location="cpu", weights_only=True)
    assert sorted(theirs) == sorted(ours)
    for key, value in ours.items():
        assert theirs[key].dtype == value.dtype and torch.equal(theirs[key], value), key
    commit.verify(ckpt)  # the tool wrote nothing into the checkpoint
