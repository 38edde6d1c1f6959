"""Two runs on one machine at once, each with its own local Ray cluster (issue 16, finding 6): neither
finds the other's cluster (the thread of Ray Train's placement-group cleaner died with "Found multiple
active Ray instances"), neither takes the other's ports, both finish."""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, read_jsonl

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
def test_two_concurrent_runs_each_on_its_own_local_cluster_both_finish(digits_dir, tmp_path):
    args = [
        "configs/smoke.yaml",
        f"data.train={digits_dir}",
        "cluster.num_workers=1",  # two runs of one worker each: the machine has 2 cores
        "model.args.channels=[8,16]",
        "precision=fp32",
        "optim.warmup_steps=2",
        "train.max_steps=40",
        "train.log_every=10",
        "train.eval_every=0",
    ]
    runs = {}
    for name in ("a", "b"):
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed by the OS at exit
        runs[name] = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "train", *args, f"run_dir={tmp_path / name}"],
            cwd=REPO,
            stdout=log,
            stderr=log,
            env=os.environ.copy(),
        )
    codes = {name: proc.wait(timeout=540) for name, proc in runs.items()}
    for name, code in codes.items():
        console = (tmp_path / f"{name}.log").read_text()
        assert code == 0, console[-3000:]
        # Ray Train's placement-group cleaner looked for "the" cluster and its thread died with
        # "Found multiple active Ray instances" (the run went on, its placement group unguarded)
        logs = [p for p in (tmp_path / name / "logs").rglob("*") if p.is_file()]
        kept_logs = [p.read_text(errors="replace") for p in logs]
        for text in [console, *kept_logs]:
            assert "Exception in thread PlacementGroupCleanerMonitor" not in text
            assert "Found multiple active Ray instances" not in text
    sessions = {name: sorted((tmp_path / name / "logs").glob("ray-session_*")) for name in runs}
    assert all(len(found) == 1 for found in sessions.values()), sessions
    assert sessions["a"][0].name != sessions["b"][0].name  # two clusters, one for each run
    for name in runs:
        assert [e["event"] for e in read_jsonl(tmp_path / name / "events.jsonl")][-1] == "finish"
    spans = {}
    for name in runs:  # when each trained (both clusters were up for the whole of both spans)
        times = [m["time"] for m in read_jsonl(tmp_path / name / "metrics.jsonl")]
        spans[name] = (min(times), max(times))
    start = min(a for a, _ in spans.values())
    rounded = {n: (round(a - start, 1), round(b - start, 1)) for n, (a, b) in spans.items()}
    print(f"\ntraining spans (s): {rounded}")
