"""End to end through the CLI on a real in-process Ray cluster (loopback 127.0.0.2), 2 workers."""

import json
import re

import pytest
import torch

from pipeline import config, models
from pipeline.checkpoint import commit
from pipeline.data import shards
from pipeline.launch.plan import make_plan
from tests.helpers import evaluate_plain, read_jsonl, run_cli

pytestmark = pytest.mark.integration


def final_accuracy(stdout: str) -> float:
    match = re.search(r"final validation accuracy: ([0-9.]+)", stdout)
    assert match, stdout[-3000:]
    return float(match.group(1))


@pytest.mark.timeout(600)
def test_smoke_recipe_on_ray_then_export(digits_dir, tmp_path):
    run_dir = tmp_path / "smoke"
    proc = run_cli("train", "configs/smoke.yaml", f"data.train={digits_dir}", f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    accuracy = final_accuracy(proc.stdout)
    assert accuracy >= 0.95

    # The run dir: resolved config, metrics and events, one verified checkpoint at the last step.
    assert config.load(run_dir / "config.yaml").zero.stage == 2
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evals = [m for m in metrics if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [100, 200, 300]
    assert evals[-1]["eval/accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert all(k in metrics[0] for k in ("train/loss", "train/lr", "train/samples_per_s", "time"))
    assert [e["event"] for e in read_jsonl(run_dir / "events.jsonl")] == [
        "start",
        "checkpoint_commit",
        "finish",
    ]
    (ckpt,) = commit.committed(run_dir / "checkpoints")
    assert ckpt.name == "step_00000300"
    commit.verify(ckpt)
    assert not (run_dir / "wandb").exists()  # WANDB_MODE=disabled in tests

    # Export from the run dir (newest checkpoint), load without DeepSpeed, same accuracy.
    out = tmp_path / "smoke.pt"
    proc = run_cli("export", str(run_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "smoke.pt.json").read_text())
    assert meta["step"] == 300 and meta["model"]["name"] == "cnn"
    model = models.build(
        "cnn", meta["model"]["args"], meta["model"]["input_shape"], meta["model"]["num_classes"]
    )
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    cfg = config.load(run_dir / "config.yaml")
    exported_accuracy = evaluate_plain(model, make_plan(cfg).spec, cfg.data, cfg.precision)
    assert exported_accuracy == pytest.approx(accuracy, abs=0.005)

    proc = run_cli("eval", str(run_dir))  # the CLI's own scoring of the newest checkpoint
    assert proc.returncode == 0, proc.stderr[-3000:]
    scored = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scored["step"] == 300 and scored["eval/accuracy"] == pytest.approx(accuracy, abs=0.005)

    proc = run_cli("report", str(run_dir))  # curves and a summary without W&B
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "300 of 300" in proc.stdout and f"last {accuracy:.4f}" in proc.stdout
    assert "checkpoints   step_00000300" in proc.stdout
    png = (run_dir / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # four panels of curves, not a blank


@pytest.mark.timeout(900)
def test_cnn_mnist5k_reaches_95_percent(tmp_path):
    data = tmp_path / "mnist5k"
    proc = run_cli("data", "prepare", "mnist5k", "--out", str(data), "--samples-per-shard", "250")
    assert proc.returncode == 0, proc.stderr
    assert shards.read_manifest(data)["sample_shape"] == [1, 28, 28]
    proc = run_cli("train", "configs/cnn-mnist5k.yaml", f"data.train={data}", f"run_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert final_accuracy(proc.stdout) >= 0.95
    # checkpoint.every=200 with keep_last=2: both commits kept
    assert [p.name for p in commit.committed(tmp_path / "run" / "checkpoints")] == [
        "step_00000200",
        "step_00000400",
    ]
