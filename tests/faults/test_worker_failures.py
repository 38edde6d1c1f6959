"""A worker that raises (once, or on every attempt) and a worker that hangs, under the Ray launcher: through
the CLI, on the run's own local Ray cluster (127.0.0.1), 2 workers. What the user sees is part of the
contract: the exit code, and an error line naming the rank, the root cause and the command that resumes."""

import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from pipeline.launch import ray as ray_launcher
from pipeline.training.faults import InjectedFault
from tests.helpers import REPO, read_jsonl, run_cli

pytestmark = pytest.mark.faults

ARGS = [
    "configs/smoke.yaml",
    "model.args.channels=[8,16]",
    "precision=fp32",
    "train.log_every=1",
    "train.eval_every=0",
    "optim.warmup_steps=2",
    "checkpoint.every=2",
    "checkpoint.keep_last=10",
    "data.num_workers=0",
    "train.max_steps=8",
]
CAUSE = "InjectedFault: injected by PIPELINE_FAULTS at step 5 on rank 1"


def events(run_dir, kind):
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == kind]


# The CLI's own error line starts a line; Ray forwards worker output that may hold "error: " inside a
# line (a worker that aborted while Ray tore the group down printed "Fatal Python error: ...").
CLI_ERROR = re.compile(r"^error: ", re.MULTILINE)


def error_part(stderr):
    """What the CLI itself printed: from its `error:` line to the end (Ray's worker lines come before)."""
    starts = [m.start() for m in CLI_ERROR.finditer(stderr)]
    assert len(starts) == 1, stderr[-3000:]
    return stderr[starts[0] :]


@pytest.mark.timeout(600)
def test_a_worker_that_raises_once_is_restarted_and_the_run_finishes(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = [*ARGS, f"data.train={digits_dir}", "cluster.max_failures=1", f"run_dir={run_dir}"]
    proc = run_cli("train", *args, env={"PIPELINE_FAULTS": "raise@5:1", "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert CAUSE in proc.stderr  # the worker's traceback, as Ray printed it: why it restarted
    assert not CLI_ERROR.search(proc.stderr)
    (restart,) = events(run_dir, "restart")
    (resume,) = events(run_dir, "resume")
    assert restart["attempt"] == 1
    # the raise comes before step 5's agreement, which would have committed step 4's background save
    assert resume["from_step"] in (2, 4)
    steps = [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in m]
    assert steps == list(range(1, 9))  # every step logged once, in order
    assert events(run_dir, "finish")[-1]["step"] == 8


@pytest.mark.timeout(600)
def test_a_worker_that_fails_every_attempt_exits_1_naming_rank_cause_and_resume_command(
    digits_dir, tmp_path, monkeypatch
):
    for key in ("SLURM_JOB_ID", "RAY_JOB_CONFIG_JSON_ENV_VAR"):  # inside a job the hint names the job
        monkeypatch.delenv(key, raising=False)
    run_dir = tmp_path / "run"
    args = [*ARGS, f"data.train={digits_dir}", "cluster.max_failures=1", f"run_dir={run_dir}"]
    proc = run_cli("train", *args, env={"PIPELINE_FAULTS": "raise_always@5:1", "WANDB_MODE": "disabled"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    error = error_part(proc.stderr)
    assert f"error: training failed: rank 1: {CAUSE} (after cluster.max_failures=1 restart(s)" in error
    assert str(run_dir / "logs") in error  # where the full traceback is kept
    assert "Traceback" not in error  # Ray's summary repeated every worker's traceback in the error line
    resume = shlex.join(["pipeline", "train", *args])
    assert f"to resume from the last committed checkpoint, re-run: {resume}\n" in error
    assert [e["attempt"] for e in events(run_dir, "restart")] == [1]  # max_failures restarts, no more
    assert len(events(run_dir, "start")) == 2


@pytest.mark.serial  # asserts a wall-time bound
@pytest.mark.timeout(600)
def test_a_hung_worker_fails_the_ray_run_within_the_collective_timeout(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    timeout_s = 10
    args = [
        *ARGS,
        f"data.train={digits_dir}",
        "cluster.max_failures=0",
        f"cluster.collective_timeout_s={timeout_s}",
        f"run_dir={run_dir}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PIPELINE_FAULTS": "hang@5:1", "WANDB_MODE": "disabled"},  # rank 1 stops at step 5
    )
    _, stderr = proc.communicate(timeout=500)
    ended = time.time()
    assert proc.returncode == 1, stderr[-3000:]
    last_step = max(m["time"] for m in read_jsonl(run_dir / "metrics.jsonl"))  # step 4: then the hang
    # rank 0 gives up on its next collective after timeout_s; Ray then tears the worker group down
    # (the hung rank included) and the driver exits. A bound for correctness, not a speed target.
    assert ended - last_step < timeout_s + 90, ended - last_step
    error = error_part(stderr)
    assert "rank 0: RuntimeError: " in error and "Timed out" in error
    assert f"cluster.collective_timeout_s={timeout_s} s for rank(s) 1, which raised nothing" in error
    print(f"\nhang: rank 1 hung after step 4; the run exited {ended - last_step:.1f} s later")


class _WorkerGroupError(Exception):
    """Ray's WorkerGroupError as ray.py reads it: `worker_failures`, {rank: the exception}."""

    def __init__(self, failures):
        super().__init__("Training failed due to worker errors: ...")
        self.worker_failures = failures


def test_failure_message_names_each_failed_rank_with_the_first_line_of_its_cause(tmp_path):
    from pipeline import config

    cfg = config.load("configs/smoke.yaml", [f"run_dir={tmp_path}", "cluster.max_failures=3"])
    # a SIGKILLed worker: Ray's failed health check around its ActorDiedError, many lines each
    dead = RuntimeError("A worker health check failed.\nWorker info: ...")
    dead.health_check_failure = RuntimeError(
        "The actor died unexpectedly before finishing this task.\n\tpid: 1"
    )
    error = _WorkerGroupError({1: dead, 0: InjectedFault("boom")})
    message = ray_launcher._failure_message(error, cfg)
    assert message.startswith(
        "rank 0: InjectedFault: boom; rank 1: RuntimeError: The actor died unexpectedly before "
        "finishing this task. (after cluster.max_failures=3 restart(s)"
    )
    assert "health check" not in message and "pid" not in message
    assert "hung" not in message  # nobody timed out: no hang suspected
    assert ray_launcher._failure_message(RuntimeError("controller"), cfg) == "controller"


def test_the_resume_hint_is_the_same_command_or_inside_a_job_the_job(monkeypatch):
    from pathlib import Path

    from pipeline.__main__ import _resume_hint

    for key in ("SLURM_JOB_ID", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(key, raising=False)
    hint = _resume_hint(Path("configs/my run.yaml"), ["model.args.channels=[8,16]", "run_dir=runs/a"])
    assert hint.endswith(
        "re-run: pipeline train 'configs/my run.yaml' 'model.args.channels=[8,16]' run_dir=runs/a"
    )
    monkeypatch.setenv("SLURM_JOB_ID", "42")  # the command names the job's cluster address: gone
    assert "submit the job again" in _resume_hint(Path("c.yaml"), ["cluster.address=10.0.0.1:6379"])
