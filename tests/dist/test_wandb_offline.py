"""What an offline W&B run records, read back from its `.wandb` file (2 workers, local launcher): one
run (rank 0 only), the resolved config, the logged metrics at their steps, sample-grid media, and one
run id with increasing steps across a resume."""

import pytest

from pipeline import config, launch
from pipeline.launch.plan import make_plan
from tests.helpers import read_jsonl, read_wandb

pytestmark = pytest.mark.dist

COMMON = [
    "cluster.launcher=local",
    "tracking.wandb.mode=offline",
    "train.log_every=2",
    "train.eval_every=2",
    "optim.warmup_steps=1",
    "precision=fp32",
    "checkpoint.every=2",
]


def train(digits_dir, run_dir, steps, *extra):
    cfg = config.load(
        "configs/smoke.yaml", [*COMMON, f"data.train={digits_dir}", f"run_dir={run_dir}", f"train.max_steps={steps}", *extra]
    )
    return launch.train(make_plan(cfg))


def segments(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.timeout(300)
def test_one_offline_run_with_config_metrics_and_one_id_across_a_resume(digits_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the suite disables W&B; this test is about it
    run_dir = tmp_path / "run"
    train(digits_dir, run_dir, 4, "model.args.channels=[8,16]")
    (first,) = segments(run_dir)  # two workers, one W&B run: only rank 0 talks to W&B
    recorded = read_wandb(first)
    (start,) = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "start"]
    assert recorded["run_id"] == start["run_id"]
    assert {"model", "optim", "zero", "data"} <= set(recorded["config"])
    rows = {r["_step"]: r for r in recorded["history"]}
    assert sorted(rows) == [2, 4]
    assert all("train/loss" in r and "eval/accuracy" in r for r in rows.values())
    logged = {m["step"]: m["train/loss"] for m in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in m}
    assert {s: r["train/loss"] for s, r in rows.items()} == logged  # W&B and metrics.jsonl agree

    train(digits_dir, run_dir, 8, "model.args.channels=[8,16]")  # the same run, continued
    second = next(s for s in segments(run_dir) if s != first)
    again = read_wandb(second)
    assert again["run_id"] == recorded["run_id"]  # one run id across the segments
    steps = [r["_step"] for r in recorded["history"]] + [r["_step"] for r in again["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # strictly increasing across the resume


@pytest.mark.timeout(300)
def test_a_generative_run_logs_its_sample_grids_as_media(digits_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "ae"
    train(digits_dir, run_dir, 4, "task.name=autoencoder", "model.name=autoencoder", "model.args={channels: [8, 16]}")
    (segment,) = segments(run_dir)
    rows = [r for r in read_wandb(segment)["history"] if "samples/grid/_type" in r]
    assert [r["_step"] for r in rows] == [2, 4] and all(r["samples/grid/_type"] == "image-file" for r in rows)
    for row in rows:  # the media files the history points at exist, and are our grids
        media = segment.parent / "files" / row["samples/grid/path"]
        assert media.is_file() and media.read_bytes()[:4] == b"\x89PNG"
    assert all("eval/recon_mse" in r for r in read_wandb(segment)["history"])
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step_00000002.png", "step_00000004.png"]


def test_online_init_arguments_keep_one_run_per_training_run(tmp_path):
    """Online mode without the internet: the exact wandb.init arguments of a resumed segment."""
    from pipeline.config import WandbConfig
    from pipeline.tracking import wandb_init_kwargs

    cfg = WandbConfig(mode="online", project="proj", entity="team", group="sweep-1", tags=["a", "b"])
    kwargs = wandb_init_kwargs(cfg, "online", tmp_path, {"seed": 3}, "abc123", "smoke")
    assert kwargs == {
        "project": "proj",
        "entity": "team",
        "group": "sweep-1",
        "tags": ["a", "b"],
        "job_type": "train",
        "name": "smoke",
        "id": "abc123",  # the id stored in the checkpoint's TrainState: the same on every segment
        "resume": "allow",  # continue that run if it exists, create it otherwise
        "mode": "online",
        "dir": str(tmp_path),
        "config": {"seed": 3},
    }


@pytest.mark.timeout(300)
def test_wandb_disabled_by_config_writes_no_wandb_dir_but_metrics(digits_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "off"
    train(digits_dir, run_dir, 2, "model.args.channels=[8,16]", "tracking.wandb.mode=disabled")
    assert not (run_dir / "wandb").exists()
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in m] == [2]
