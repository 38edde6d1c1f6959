"""The same run under ZeRO 0-3 x fp32/bf16, 2 real processes (gloo), through the real launcher.

Each case trains the BatchNorm CNN for a few steps, checks that the loss goes down, then exports
the checkpoint and checks the plain nn.Module gives the accuracy the run reported.
"""

import json

import pytest
import torch

from pipeline import config, launch, models
from pipeline.checkpoint import commit, export
from pipeline.launch.plan import make_plan
from tests.helpers import evaluate_plain, read_jsonl

pytestmark = pytest.mark.dist


@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_and_precision(stage, precision, digits_dir, tmp_path):
    cfg = config.load(
        "configs/smoke.yaml",
        [
            f"data.train={digits_dir}",
            f"run_dir={tmp_path / 'run'}",
            f"zero.stage={stage}",
            f"precision={precision}",
            "cluster.launcher=local",
            "model.args.channels=[8,16]",
            "train.max_steps=30",
            "train.log_every=5",
            "optim.warmup_steps=5",
            "train.eval_every=0",
        ],
    )
    final = launch.train(make_plan(cfg))

    logged = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    losses = [r["train/loss"] for r in logged]
    assert [r["step"] for r in logged] == [5, 10, 15, 20, 25, 30]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.75 * losses[0], losses
    assert final["step"] == 30 and final["eval/samples"] == 359

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000030"
    manifest = commit.verify(ckpt)
    assert manifest["zero_stage"] == stage and manifest["world_size"] == 2
    events = [e["event"] for e in read_jsonl(tmp_path / "run" / "events.jsonl")]
    assert events == ["start", "startup", "checkpoint_commit", "finish"]

    out = tmp_path / "weights.pt"
    export.export(ckpt, out)
    meta = json.loads(out.with_name("weights.pt.json").read_text())
    model = models.build(
        meta["model"]["name"],
        meta["model"]["args"],
        meta["model"]["input_shape"],
        meta["model"]["num_classes"],
    )
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert all(v.dtype != torch.bfloat16 for v in model.state_dict().values())
    accuracy = evaluate_plain(model, make_plan(cfg).spec, cfg.data, precision)
    assert accuracy == pytest.approx(final["eval/accuracy"], abs=0.005)
