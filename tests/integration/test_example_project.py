"""The user project in examples/myproject, as its README walk-through runs it: shards written by
webdataset's ShardWriter in the project's own format, indexed by `pipeline data index` with the
project's decode function, trained through the CLI with its own model and task (and the config in
configs/example-myproject.yaml), importable only through PYTHONPATH."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO, read_jsonl, run_cli

pytestmark = pytest.mark.integration

PROJECT = REPO / "examples" / "myproject"


@pytest.mark.timeout(600)
def test_the_example_project_trains_from_its_own_shards(tmp_path):
    shards_dir = tmp_path / "myproject-shards"
    made = subprocess.run(
        [sys.executable, str(PROJECT / "make_shards.py"), "--out", str(shards_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    assert not (shards_dir / "MANIFEST.json").exists()
    env = {"PYTHONPATH": str(PROJECT)}
    refused = run_cli("train", "configs/example-myproject.yaml", f"data.train={shards_dir}", env=env)
    assert refused.returncode == 2 and "pipeline data index" in refused.stderr, refused.stderr

    indexed = run_cli(
        "data", "index", str(shards_dir), "--out", str(shards_dir), "--val-fraction", "0.2",
        "--decode", "myproject.decode:decode", env=env,
    )  # fmt: skip
    assert indexed.returncode == 0, indexed.stderr
    run_dir = tmp_path / "run"
    trained = run_cli(
        "train", "configs/example-myproject.yaml", f"data.train={shards_dir}", f"run_dir={run_dir}",
        "cluster.launcher=local", "train.max_steps=120", "train.eval_every=60",
        "tracking.wandb.mode=disabled", env=env,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    final = read_jsonl(run_dir / "metrics.jsonl")[-1]
    assert final["eval/accuracy"] > 0.85, final
    assert 0 <= final["eval/ece"] < 0.3, final  # the task's own metric
    assert any("train/mix" in r for r in read_jsonl(run_dir / "metrics.jsonl"))
