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
        "configs/smoke.yaml",
        [*COMMON, f"data.train={digits_dir}", f"run_dir={run_dir}", f"train.max_steps={steps}", *extra],
    )
    return launch.train(make_plan(cfg))


def segments(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.timeout(300)
def test_one_offline_run_with_config_metrics_and_one_id_across_a_resume(
    digits_dir, tmp_path, monkeypatch, capfd
):
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
    for row in rows.values():  # the optimizer and system panels
        assert row["train/grad_norm"] > 0 and row["sys/peak_rss_mb"] > 100
        # weight decay puts biases/norms in their own param group: one LR panel per group
        assert row["train/lr/group0"] == row["train/lr/group1"] == row["train/lr"]
        assert row["train/samples_skipped"] == 0 and row["train/nonfinite_steps"] == 0
    assert rows[2]["train/lr"] > rows[4]["train/lr"] >= 0  # the schedule decays to the end
    # the start summary: recorded, and printed once (rank 0) before the first step
    assert start["world_size"] == 2 and start["backend"] == "gloo" and start["resume_from"] is None
    assert start["params_trainable"] > 1000 and start["params_frozen"] == 0
    assert sum(start["shards_per_rank"]) == start["train_shards"]  # a fresh epoch: every shard, once
    assert sum(start["samples_per_rank"]) == start["train_samples"]
    assert start["wandb"].startswith(f"offline, {first.parent}")
    printed = capfd.readouterr().out
    assert printed.count(f"(id {start['run_id']}): fresh start") == 1 and "ZeRO stage" in printed
    summary = recorded["summary"]  # the end-of-run summary
    assert summary["restarts"] == 0 and summary["step"] == 4
    assert summary["checkpoint/last"] == str(run_dir / "checkpoints" / "step_00000004")
    assert summary["best/eval/accuracy"] == max(r["eval/accuracy"] for r in rows.values())
    best_step = max(rows, key=lambda s: (rows[s]["eval/accuracy"], -s))  # the first best
    assert summary["checkpoint/best"] == str(run_dir / "checkpoints" / f"step_{best_step:08d}")
    assert recorded["artifacts"] == []  # tracking.wandb.log_checkpoint is off by default

    # the same run, continued; its last checkpoint logged as an artifact by reference
    train(digits_dir, run_dir, 8, "model.args.channels=[8,16]", "tracking.wandb.log_checkpoint=true")
    second = next(s for s in segments(run_dir) if s != first)
    again = read_wandb(second)
    assert again["run_id"] == recorded["run_id"]  # one run id across the segments
    steps = [r["_step"] for r in recorded["history"]] + [r["_step"] for r in again["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # strictly increasing across the resume
    assert again["summary"]["restarts"] == 1
    resumed = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "start"][1]
    assert resumed["resume_step"] == 4
    assert f"resuming after step 4 from {run_dir / 'checkpoints' / 'step_00000004'}" in capfd.readouterr().out
    (artifact,) = again["artifacts"]
    last = run_dir / "checkpoints" / "step_00000008"
    assert artifact["type"] == "model" and sorted(artifact["aliases"]) == ["latest", "step_8"]
    assert {ref.removeprefix(last.as_uri() + "/") for ref in artifact["refs"]} >= {
        "MANIFEST.json",
        "trainer_state.json",
    }


@pytest.mark.timeout(300)
def test_a_generative_run_logs_its_sample_grids_as_media(digits_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "ae"
    train(
        digits_dir,
        run_dir,
        4,
        "task.name=autoencoder",
        "model.name=autoencoder",
        "model.args={channels: [8, 16]}",
    )
    (segment,) = segments(run_dir)
    rows = [r for r in read_wandb(segment)["history"] if "samples/grid/_type" in r]
    assert [r["_step"] for r in rows] == [2, 4] and all(r["samples/grid/_type"] == "image-file" for r in rows)
    for row in rows:  # the media files the history points at exist, and are our grids
        media = segment.parent / "files" / row["samples/grid/path"]
        assert media.is_file() and media.read_bytes()[:4] == b"\x89PNG"
    assert all("eval/recon_mse" in r for r in read_wandb(segment)["history"])
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "step_00000002.png",
        "step_00000004.png",
    ]


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


@pytest.mark.timeout(300)
def test_wandb_mode_disabled_in_the_environment_wins_over_the_config(digits_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_dir = tmp_path / "env-off"
    train(digits_dir, run_dir, 2, "model.args.channels=[8,16]")  # the config says offline
    assert not (run_dir / "wandb").exists()
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in m] == [2]
