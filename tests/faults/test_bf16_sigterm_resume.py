"""Resume after SIGTERM under bf16 (the default precision where the CPU computes it natively) is the run
that was never interrupted: bitwise, per step and in the final weights.

The local launcher: SIGTERM reaches the driver, which writes RUN_DIR/STOP (launch.train), and the
workers agree on it, commit and exit 75 (training/signals.py), the same path as under Ray, whose
workers see only that file; tests/faults/test_ray_faults.py covers the Ray driver's side of it."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from pipeline.checkpoint import export
from tests.faults.test_ray_faults import by_step, wait_for_step
from tests.helpers import REPO, read_jsonl, run_cli

pytestmark = pytest.mark.faults

MAX_STEPS = 150  # enough left after the signal that the stop lands mid-training, not in the final save


def args_for(digits_dir, run_dir):
    return [
        "train",
        "configs/smoke.yaml",
        "cluster.launcher=local",
        "model.args.channels=[8,16]",
        "precision=bf16",  # explicit: `auto` picks it only on a CPU with native bf16
        "train.log_every=1",
        "train.eval_every=0",
        "optim.warmup_steps=2",
        "checkpoint.every=50",
        "checkpoint.keep_last=10",
        "data.num_workers=1",
        "data.ledger=true",
        f"train.max_steps={MAX_STEPS}",
        f"data.train={digits_dir}",
        f"run_dir={run_dir}",
    ]


@pytest.mark.timeout(600)
def test_bf16_run_sigtermed_and_resumed_equals_the_unbroken_run_bitwise(digits_dir, tmp_path):
    env = {"WANDB_MODE": "disabled"}
    unbroken = run_cli(*args_for(digits_dir, tmp_path / "unbroken"), env=env)
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]

    run_dir = tmp_path / "stopped"
    args = args_for(digits_dir, run_dir)
    with open(tmp_path / "stopped.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args],
            cwd=REPO,
            stdout=log,
            stderr=log,
            env={**os.environ, **env},
        )
        wait_for_step(run_dir, 10, proc)
        os.kill(proc.pid, signal.SIGTERM)  # the driver only, as Slurm or Kubernetes would
        assert proc.wait(timeout=300) == 75, (tmp_path / "stopped.log").read_text()[-3000:]
    (preempted,) = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "preempted"]
    stop = preempted["step"]
    assert 10 <= stop < MAX_STEPS  # mid-way: a stop in the final save would prove nothing
    assert (run_dir / "checkpoints" / f"step_{stop:08d}" / "MANIFEST.json").is_file()
    resumed = run_cli(*args, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (resume,) = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert resume["from_step"] == stop  # zero lost steps

    names = ("unbroken", "stopped")
    metrics = {n: read_jsonl(tmp_path / n / "metrics.jsonl") for n in names}
    starts = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "start"]
    assert [s["precision"] for s in starts] == ["bf16", "bf16"]
    steps = [m["step"] for m in metrics["stopped"] if "train/loss" in m]
    assert steps == list(range(1, MAX_STEPS + 1))  # every step logged once, in order
    assert by_step(metrics["stopped"], "train/loss") == by_step(metrics["unbroken"], "train/loss")  # bitwise
    for rank in (0, 1):  # the samples consumed at each step, before and after the stop
        ledgers = [by_step(read_jsonl(tmp_path / n / "ledger" / f"rank{rank}.jsonl"), "keys") for n in names]
        assert ledgers[0] == ledgers[1]

    commits = [
        {
            e["step"]: e["weights"]
            for e in read_jsonl(tmp_path / n / "events.jsonl")
            if e["event"] == "checkpoint_commit"
        }
        for n in names
    ]
    assert commits[0][MAX_STEPS] == commits[1][MAX_STEPS]  # the fp32 master weights' checksums
    final = [
        export.consolidated_state_dict(tmp_path / n / "checkpoints" / f"step_{MAX_STEPS:08d}") for n in names
    ]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    print(f"\nbf16: SIGTERM -> exit 75 at step {stop} -> resumed -> bitwise equal to the unbroken run")
