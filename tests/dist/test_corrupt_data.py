"""data.on_error=skip through a real 2-process run: each bad sample skipped and counted exactly once,
and too many bad samples abort the run with exit 1."""

import pytest

from pipeline import config, launch
from pipeline.launch.plan import make_plan
from tests.helpers import read_jsonl, run_cli

pytestmark = pytest.mark.dist

COMMON = [
    "cluster.launcher=local",
    "model.args.channels=[8,16]",
    "data.batch_size=30",
    "data.shuffle_buffer=0",
    "data.on_error=skip",
    "train.log_every=4",
    "optim.warmup_steps=2",
    "data.val=null",
]


@pytest.mark.timeout(300)
def test_skip_mode_run_counts_each_injected_bad_sample(corrupt_digits, tmp_path):
    out, names, expected = corrupt_digits
    # Unshuffled, rank 0 reads shards 0, 2, 4 ... and rank 1 shards 1, 3, 5 ...: 12 steps of 30 reach
    # past the damaged shards 0-3 and stay inside the first epoch, so each bad sample is met once.
    cfg = config.load(
        "configs/smoke.yaml",
        [
            *COMMON,
            f"data.train={out}",
            f"run_dir={tmp_path / 'run'}",
            "train.max_steps=12",
            "data.max_skip_fraction=0.2",
        ],
    )
    final = launch.train(make_plan(cfg))
    injected = 1 + 1 + expected["truncated_lost"] + expected["missing"]
    assert final["samples_skipped"] == injected == 192
    skips = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["event"] == "skip_sample"]
    assert len(skips) == injected
    assert {(e["shard"].rsplit("/", 1)[-1], e["key"]) for e in skips} >= {
        expected["garbage"],
        expected["unlabeled"],
    }
    assert sum(e["shard"].endswith(names[3]) for e in skips) == expected["missing"]
    assert final["train/samples_seen"] == 12 * 2 * 30  # every step still trained on full batches


@pytest.mark.timeout(300)
def test_too_many_bad_samples_exit_1(corrupt_digits, tmp_path):
    out, _, _ = corrupt_digits
    proc = run_cli(
        "train",
        "configs/smoke.yaml",
        *COMMON,
        f"data.train={out}",
        f"run_dir={tmp_path / 'run'}",
        "train.max_steps=12",
        "data.max_skip_fraction=0.05",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "bad samples skipped" in proc.stderr and "max_skip_fraction" in proc.stderr
