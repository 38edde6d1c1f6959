"""End to end through the CLI on the run's own local Ray cluster (loopback 127.0.0.1), 2 workers."""

import json
import re
from pathlib import Path

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
    # A quiet console: our lines, once; Ray's chatter only in the run dir's logs.
    console = proc.stdout + proc.stderr
    assert console.count("): fresh start") == 1  # the start summary
    assert "step 25/300 | loss" in proc.stdout and "| ETA --" in proc.stdout  # plain lines off a terminal
    for chatter in ("PlacementGroupCleaner", "Reporting training result", "TrainController", "core_worker"):
        assert chatter not in console
    assert (run_dir / "logs" / "ray.log").is_file() and list((run_dir / "logs").glob("ray-session_*"))

    # The run dir: resolved config, metrics and events, one verified checkpoint at the last step.
    assert config.load(run_dir / "config.yaml").zero.stage == 2
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evals = [m for m in metrics if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [100, 200, 300]
    assert evals[-1]["eval/accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert all(k in metrics[0] for k in ("train/loss", "train/lr", "train/samples_per_s", "time"))
    events = read_jsonl(run_dir / "events.jsonl")
    assert [e["event"] for e in events] == ["start", "startup", "checkpoint_commit", "finish"]
    # the startup breakdown: every phase measured, and together they are the whole startup
    phases = {k: v for k, v in events[1].items() if k.endswith("_s") and k != "startup_s"}
    assert set(phases) == {
        "cli_and_plan_s",
        "ray_start_s",
        "worker_group_s",
        "deepspeed_init_s",
        "data_and_tracking_s",
        "first_batch_s",
        "first_step_s",
    }
    assert all(v >= 0 for v in phases.values()) and phases["ray_start_s"] > 0
    assert sum(phases.values()) == pytest.approx(events[1]["startup_s"], abs=0.01)
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


@pytest.mark.timeout(300)
def test_a_stopped_clusters_leftover_address_does_not_capture_a_local_run(digits_dir, tmp_path):
    """`ray start --block` ended by a signal leaves its address in /tmp/ray/ray_current_cluster;
    ray.init() would try to join that dead cluster. Our in-process cluster is always a new one."""
    leftover = Path("/tmp/ray/ray_current_cluster")
    saved = leftover.read_text() if leftover.exists() else None
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_text("127.0.0.2:1")  # nothing listens there
    try:
        args = [f"data.train={digits_dir}", f"run_dir={tmp_path / 'run'}", "train.max_steps=10"]
        proc = run_cli("train", "configs/smoke.yaml", *args, "optim.warmup_steps=1")
    finally:
        if saved is None:
            leftover.unlink(missing_ok=True)
        else:
            leftover.write_text(saved)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final step 10" in proc.stdout


@pytest.mark.timeout(600)
def test_bench_overhead_prints_a_ratio_table_against_ddp(tmp_path):
    out = tmp_path / "rows.json"
    args = [
        "bench",
        "overhead",
        "--recipes",
        "cnn",
        "--stages",
        "0",
        "--data",
        str(tmp_path),
        "--json",
        str(out),
    ]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    ddp, ours = rows["cnn: DDP loop (gloo, in-memory batches)"], rows["cnn: pipeline ZeRO-0"]
    assert ddp["unit"] == ours["unit"] == "s/step" and 0 < ddp["value"] < 5 and 0 < ours["value"] < 5
    assert ours["baseline"] == ddp["value"] and ours["ratio"] == pytest.approx(ours["value"] / ddp["value"])
    assert 0 <= rows["cnn: input stall ZeRO-0"]["value"] < 1
    assert "cnn: pipeline ZeRO-0" in proc.stdout  # the printed table
