"""`model.activation_checkpointing` through DeepSpeed (issue 19): under ZeRO 0-3 with 2 gloo workers, a
ResNet-18 (BatchNorm, dropout) and an LSTM train to the same per-step losses and final weights with
their blocks checkpointed as without (fp32, bitwise). Under ZeRO-3 the recomputation gathers each
block's parameters again. The 16 runs share one start of the local launcher's pair of processes."""

from __future__ import annotations

import pytest
import torch

from pipeline import config
from pipeline.checkpoint import export
from pipeline.launch.plan import make_plan, worker_payload
from tests.helpers import few_local_steps, read_jsonl, run_local_pair

pytestmark = pytest.mark.dist

STEPS = 3
MODELS = {
    "resnet18": ["model.name=resnet18", "model.args={width: 8, dropout: 0.2}"],
    "lstm": ["model.name=lstm", "model.args={hidden_size: 16, num_layers: 2, dropout: 0.3}"],
}


@pytest.mark.timeout(400)
def test_checkpointed_blocks_train_bitwise_like_plain_ones_under_every_zero_stage(digits_dir, tmp_path):
    plans = {}
    for model, model_args in MODELS.items():
        for stage in (0, 1, 2, 3):
            for on in (False, True):
                name = f"{model}-zero{stage}-{'ckpt' if on else 'plain'}"
                cfg = config.load(
                    "configs/smoke.yaml",
                    [
                        f"data.train={digits_dir}",
                        f"run_dir={tmp_path / name}",
                        *model_args,
                        f"model.activation_checkpointing={str(on).lower()}",
                        f"zero.stage={stage}",
                        *few_local_steps(STEPS),
                    ],
                )
                plans[name] = make_plan(cfg)
                assert bool(plans[name].checkpointed_blocks) == on
    run_local_pair([worker_payload(plan, name) for name, plan in plans.items()])

    def losses(name):
        return [r["train/loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "train/loss" in r]

    for model in MODELS:
        for stage in (0, 1, 2, 3):
            plain, ckpt = f"{model}-zero{stage}-plain", f"{model}-zero{stage}-ckpt"
            assert len(losses(plain)) == STEPS and losses(ckpt) == losses(plain), ckpt  # bitwise
            weights = [
                export.consolidated_state_dict(tmp_path / n / "checkpoints" / f"step_{STEPS:08d}")
                for n in (plain, ckpt)
            ]
            assert weights[0].keys() == weights[1].keys()
            assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), ckpt
