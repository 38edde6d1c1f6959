"""The language-model recipes (configs/lstm-lm-text.yaml, configs/gru-lm-text.yaml, made tiny) on token
shards under ZeRO 0-3 x fp32/bf16 with 2 workers: finite losses, eval metrics, generated samples
written, every parameter changed, and tied embedding/output weights still one matrix in the
checkpoint. The 8 runs share one start of the local launcher's pair of gloo processes; the first also
logs to an offline W&B run, whose generated-text tables are read back."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline import config, models, tasks
from pipeline.checkpoint import commit, export
from pipeline.launch.plan import make_plan, worker_payload
from tests.helpers import read_jsonl, read_wandb, run_local_pair

pytestmark = pytest.mark.dist

STEPS = 4


def initial_weights(cfg, spec):
    task = tasks.build(cfg.task.name, cfg.task.args)
    torch.manual_seed(cfg.seed)
    model = models.build(
        cfg.model.name, cfg.model.args, spec.sample_shape, task.num_outputs(spec.num_classes)
    )
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.timeout(400)
def test_language_models_train_under_every_zero_stage_and_precision(text_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the first run's offline W&B
    plans = {}
    for stage in (0, 1, 2, 3):
        for precision in ("fp32", "bf16"):
            cell = "lstm" if stage % 2 == 0 else "gru"
            tied = precision == "bf16"  # every stage trains tied weights once and untied once
            name = f"{cell}-zero{stage}-{precision}"
            cfg = config.load(
                f"configs/{cell}-lm-text.yaml",
                [
                    f"data.train={text_dir}",
                    f"run_dir={tmp_path / name}",
                    f"zero.stage={stage}",
                    f"precision={precision}",
                    "cluster.launcher=local",
                    "cluster.collective_timeout_s=120",
                    "data.batch_size=8",
                    f"model.args={{embedding_dim: 24, hidden_size: 24, num_layers: 2, output: sequence, "
                    f"tie_weights: {str(tied).lower()}}}",
                    "task.args.sample_tokens=12",
                    f"train.max_steps={STEPS}",
                    "optim.warmup_steps=1",
                    "train.log_every=1",
                    f"train.eval_every={STEPS // 2}",
                    "checkpoint.every=0",
                    f"tracking.wandb.mode={'offline' if not plans else 'disabled'}",
                ],
            )
            plans[name] = make_plan(cfg)
    run_local_pair([worker_payload(plan, name) for name, plan in plans.items()])

    for name, plan in plans.items():
        rows = read_jsonl(tmp_path / name / "metrics.jsonl")
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        assert len(losses) == STEPS and all(math.isfinite(v) for v in losses), (name, losses)
        final = [r for r in rows if "eval/bpc" in r][-1]
        assert math.isfinite(final["eval/bpc"]) and final["eval/perplexity"] > 1, name
        assert final["eval/bpc"] == pytest.approx(final["eval/loss"] / math.log(2)), name
        samples = (tmp_path / name / "samples" / f"step_{STEPS:08d}.txt").read_text()
        assert samples.count("=== prompt") == 3, (name, samples)

        ckpt = tmp_path / name / "checkpoints" / f"step_{STEPS:08d}"
        assert commit.verify(ckpt)["zero_stage"] == plan.cfg.zero.stage
        before = initial_weights(plan.cfg, plan.spec)
        after = export.consolidated_state_dict(ckpt, "model")
        unchanged = [k for k in before if torch.equal(after[k].float(), before[k].float())]
        assert not unchanged, f"{name}: unchanged {unchanged}"
        if plan.cfg.model.args["tie_weights"]:
            assert torch.equal(after["embedding.weight"], after["head.1.weight"]), name
    assert_text_tables(tmp_path / next(iter(plans)))


def assert_text_tables(run_dir):
    """The W&B table of each eval (step, prompt, continuation) holds what samples/step_X.txt holds."""
    (segment,) = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    rows = [r for r in read_wandb(segment)["history"] if "samples/text/_type" in r]
    assert [r["_step"] for r in rows] == [STEPS // 2, STEPS]
    for row in rows:
        assert row["samples/text/_type"] == "table-file"
        table = json.loads((segment.parent / "files" / row["samples/text/path"]).read_text())
        assert table["columns"] == ["step", "prompt", "continuation"]
        written = (run_dir / "samples" / f"step_{row['_step']:08d}.txt").read_text()
        assert [r[1] for r in table["data"]] == ["The ", "If the ", "A class "]
        assert all(r[0] == row["_step"] and f"{r[1]}{r[2]}\n" in written for r in table["data"])
        assert all(len(r[2]) == 12 for r in table["data"])
