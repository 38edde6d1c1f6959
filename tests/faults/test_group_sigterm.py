"""SIGTERM to the whole process group, as `timeout`, `kill -- -PGID` and supervisors deliver it
(issue 16). The run's Ray cluster lives in a session of its own, so the
group signal reaches the driver alone: it commits, exits 75, and the re-run loses no step."""

import os
import signal
import time

import pytest

from tests.faults.test_ray_faults import BASE, start_cli, wait_for_step
from tests.helpers import read_jsonl, run_cli

pytestmark = pytest.mark.faults


@pytest.mark.timeout(600)
def test_sigterm_to_the_process_group_commits_exits_75_and_loses_no_step(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    max_steps = 150  # enough left after step 8 that the stop lands mid-training
    args = ["train", "configs/smoke.yaml", *BASE, f"data.train={digits_dir}", f"train.max_steps={max_steps}"]
    args.append(f"run_dir={run_dir}")
    proc = start_cli(*args)  # its own session: the CLI leads the process group we signal
    wait_for_step(run_dir, 8, proc)
    signalled = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)  # every process in the driver's group, as `timeout` does
    code = proc.wait(timeout=180)
    log = (tmp_path / "run.log").read_text()
    assert code == 75, log[-3000:]
    grace_s = time.monotonic() - signalled
    (preempted,) = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "preempted"]
    step = preempted["step"]
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / "MANIFEST.json").is_file()

    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (resume,) = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert resume["from_step"] == step  # zero lost steps
    steps = [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in m]
    assert steps == list(range(1, max_steps + 1))  # every step once, in order, across the two runs
    print(f"\ngroup SIGTERM -> commit at step {step} -> exit 75 in {grace_s:.1f} s")
