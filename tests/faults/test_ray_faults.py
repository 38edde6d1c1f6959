"""Kill a Ray worker, kill the driver, preempt with SIGTERM: through the CLI, on the run's own local
Ray cluster (127.0.0.1, loopback only), 2 workers. A resumed run must be the run that was never
interrupted."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipeline.checkpoint import export
from tests.helpers import REPO, assert_one_wandb_run, read_jsonl, run_cli

pytestmark = pytest.mark.faults

BASE = [
    "model.args.channels=[8,16]",
    "precision=fp32",
    "train.log_every=1",
    "train.eval_every=0",
    "optim.warmup_steps=2",
    "checkpoint.every=5",
    "checkpoint.keep_last=10",
    "data.num_workers=1",
    "data.ledger=true",
    "cluster.max_failures=1",
]


def by_step(records, field):
    return {r["step"]: r[field] for r in records if field in r}


@pytest.mark.timeout(600)
def test_killed_worker_restarts_and_finishes_exactly_like_an_unbroken_run(digits_dir, tmp_path):
    kill_step = random.Random(2026).randint(7, 14)
    common = [*BASE, f"data.train={digits_dir}", "train.max_steps=20"]
    unbroken = run_cli("train", "configs/smoke.yaml", *common, f"run_dir={tmp_path / 'unbroken'}")
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    killed = run_cli(
        "train",
        "configs/smoke.yaml",
        *common,
        f"run_dir={tmp_path / 'killed'}",
        env={"PIPELINE_FAULTS": f"kill@{kill_step}:1"},
    )  # SIGKILL of rank 1's process
    assert killed.returncode == 0, killed.stderr[-3000:]

    events = read_jsonl(tmp_path / "killed" / "events.jsonl")
    (restart,) = [e for e in events if e["event"] == "restart"]
    (resume,) = [e for e in events if e["event"] == "resume"]
    assert restart["attempt"] == 1
    assert kill_step - 1 - resume["from_step"] < 5  # lost at most one checkpoint interval
    metrics = {name: read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("unbroken", "killed")}
    steps = [m["step"] for m in metrics["killed"] if "train/loss" in m]
    assert steps == list(range(1, 21))  # every step logged once, in order
    assert by_step(metrics["killed"], "train/loss") == by_step(metrics["unbroken"], "train/loss")  # bitwise

    for rank in (0, 1):  # the samples consumed at each step, before and after the restart
        ledgers = [
            by_step(read_jsonl(tmp_path / n / "ledger" / f"rank{rank}.jsonl"), "keys")
            for n in ("unbroken", "killed")
        ]
        assert ledgers[0] == ledgers[1]

    final = [
        export.consolidated_state_dict(tmp_path / n / "checkpoints" / "step_00000020")
        for n in ("unbroken", "killed")
    ]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])

    # Recovery time: from the last step logged before the kill to the first step done after it.
    last_before = max(m["time"] for m in metrics["killed"] if m["step"] == kill_step - 1)
    (first_after,) = [e for e in events if e["event"] == "first_step_after_resume"]
    print(
        f"\nrecovery: worker killed at step {kill_step}, resumed from {resume['from_step']}, "
        f"{first_after['time'] - last_before:.1f} s from the kill to the next step done"
    )


def start_cli(*args, env=None):
    """`pipeline ...` in its own process group (its Ray cluster included), stdout to a file."""
    log = open(args[-1].split("=", 1)[1] + ".log", "w")  # noqa: SIM115 - closed by the OS at exit
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO,
        stdout=log,
        stderr=log,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def wait_for_step(run_dir, step, proc, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before the step was reached"
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(
            json.loads(line).get("step", 0) >= step for line in path.read_text().splitlines() if line.strip()
        ):
            return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.timeout(600)
def test_killed_driver_rerun_resumes_with_one_wandb_run(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "train",
        "configs/smoke.yaml",
        *BASE,
        f"data.train={digits_dir}",
        "train.max_steps=30",
        "tracking.wandb.mode=offline",
        f"run_dir={run_dir}",
    ]
    proc = start_cli(*args, env={"WANDB_MODE": "offline"})
    wait_for_step(run_dir, 12, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray cluster and workers: all gone at once
    proc.wait()
    rerun = run_cli(*args, env={"WANDB_MODE": "offline"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # the console: the start summary and the W&B sync hint once each (Ray Train's print patch doubled
    # every print while W&B wrapped stdout), none of W&B's own output
    assert rerun.stdout.count("): resuming after step") == 1
    assert rerun.stdout.count("W&B offline run saved") == 1
    assert "wandb:" not in rerun.stdout + rerun.stderr

    events = read_jsonl(run_dir / "events.jsonl")
    starts = [e for e in events if e["event"] == "start"]
    (resume,) = [e for e in events if e["event"] == "resume"]
    assert len(starts) == 2 and starts[0]["run_id"] == starts[1]["run_id"]
    assert starts[0]["niceness"] == [0, 0]  # cluster.worker_niceness, not Ray's 15
    assert resume["from_step"] >= 10
    steps = [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # never twice, never backwards
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(p.name.endswith(starts[0]["run_id"]) for p in wandb_runs)
    assert_one_wandb_run(run_dir, segments=2, last_step=30)


@pytest.mark.timeout(600)
def test_sigterm_commits_exits_75_and_resumes_with_no_lost_step(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "train",
        "configs/smoke.yaml",
        *BASE,
        f"data.train={digits_dir}",
        # enough steps left after step 8 that the stop lands mid-training, not in the final save
        "train.max_steps=200",
        "tracking.wandb.mode=offline",
        f"run_dir={run_dir}",
    ]
    proc = start_cli(*args, env={"WANDB_MODE": "offline"})
    wait_for_step(run_dir, 8, proc)
    signalled = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)  # the driver only, as Slurm or Kubernetes would
    assert proc.wait(timeout=120) == 75
    grace_s = time.monotonic() - signalled
    (preempted,) = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "preempted"]
    step = preempted["step"]
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / "MANIFEST.json").is_file()
    rerun = run_cli(*args, env={"WANDB_MODE": "offline"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (resume,) = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert resume["from_step"] == step  # zero lost steps
    assert_one_wandb_run(run_dir, segments=2, last_step=200)  # one W&B run across the preemption
    print(f"\npreemption: SIGTERM -> commit at step {step} -> exit 75 in {grace_s:.1f} s")
