"""A GAN (two engines, one checkpoint) killed mid-training and re-run continues from the same G and D
weights, optimizer states and step: its losses after the resume equal an unbroken run's, bitwise."""

import json

import pytest

from pipeline import config, launch
from pipeline.launch.plan import TrainingFailed, make_plan
from tests.helpers import read_jsonl

pytestmark = pytest.mark.faults

GAN = [
    "cluster.launcher=local",
    "task.name=gan",
    "model.name=dcgan",
    "model.args={latent_dim: 8, base_channels: 8}",
    "task.optim={discriminator: {lr: 1.0e-3, betas: [0.5, 0.999]}}",
    "optim.name=adam",
    "optim.betas=[0.5, 0.999]",
    "optim.warmup_steps=2",
    "precision=fp32",
    "train.max_steps=10",
    "train.log_every=1",
    "train.eval_every=5",
    "checkpoint.every=3",
    "checkpoint.keep_last=5",
    "tracking.wandb.mode=disabled",
]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("stage", [2, 3])
def test_gan_resumes_both_engines_exactly(digits_dir, tmp_path, monkeypatch, stage):
    def train(name):
        cfg = config.load(
            "configs/smoke.yaml",
            [
                "model.args={}",
                *GAN,
                f"zero.stage={stage}",
                f"data.train={digits_dir}",
                f"run_dir={tmp_path / name}",
            ],
        )
        return launch.train(make_plan(cfg))

    train("unbroken")
    monkeypatch.setenv("PIPELINE_FAULTS", "kill@8:1")  # rank 1 dies at the start of step 8
    with pytest.raises(TrainingFailed):
        train("killed")
    monkeypatch.delenv("PIPELINE_FAULTS")
    final = train("killed")  # the same command again

    events = read_jsonl(tmp_path / "killed" / "events.jsonl")
    commits = {e["step"]: e["weights"] for e in events if e["event"] == "checkpoint_commit"}
    (resume,) = [e for e in events if e["event"] == "resume"]
    assert resume["from_step"] == 6
    assert resume["weights"] == commits[6]  # G and D right after the resume = what was saved
    manifest = json.loads(
        (tmp_path / "killed" / "checkpoints" / "step_00000006" / "MANIFEST.json").read_text()
    )
    assert manifest["engines"] == ["generator", "discriminator"]  # one commit holds both

    def losses(name):
        rows = read_jsonl(tmp_path / name / "metrics.jsonl")
        return {r["step"]: (r["train/d_loss"], r["train/g_loss"]) for r in rows if "train/d_loss" in r}

    after = {s: v for s, v in losses("killed").items() if s > 6}
    assert sorted(after) == [7, 8, 9, 10]
    assert after == {s: losses("unbroken")[s] for s in after}  # optimizer states and RNG carried over
    assert final["step"] == 10
    assert (tmp_path / "killed" / "samples" / "step_00000010.png").is_file()
