"""`pipeline submit slurm` against a real single-node Slurm (slurm/local-cluster.sh): Ray-on-Slurm
trains the smoke recipe; USR1 before the time limit commits a checkpoint, exits 75, requeues the job,
and the second segment resumes that step into the same W&B run."""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from pipeline.launch.slurm import job_ports
from tests.helpers import REPO, assert_one_wandb_run, read_jsonl, run_cli

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    """A running local Slurm: started here when we are root (as in CI); otherwise skipped, unless
    PIPELINE_REQUIRE_SLURM=1 (set by .ci/run) makes a missing Slurm a failure."""
    if shutil.which("sinfo"):
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.split()
        if {"idle", "mixed", "allocated"} & set(states):
            return
    if os.geteuid() == 0:
        subprocess.run([str(REPO / "slurm" / "local-cluster.sh"), "start"], check=True, timeout=600)
        return
    message = "no Slurm: run `sudo slurm/local-cluster.sh start` (installs slurm-wlm + munge, starts them)"
    if os.environ.get("PIPELINE_REQUIRE_SLURM") == "1":
        pytest.fail(message)
    pytest.skip(message)


def submit(*args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "submit", "slurm", "configs/smoke.yaml", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def job_field(job_id, field):
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    match = re.search(rf"\b{field}=(\S*)", out.stdout)
    return match.group(1) if match else None


def wait_until(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


@pytest.mark.timeout(600)
def test_submit_wait_trains_the_smoke_recipe_inside_the_allocation(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = [f"data.train={digits_dir}", f"run_dir={run_dir}", "cluster.node_ip=127.0.0.2", "--wait"]
    result = run_cli("submit", "slurm", "configs/smoke.yaml", *args, timeout_s=540)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = int(re.search(r"submitted Slurm job (\d+)", result.stdout).group(1))
    accuracy = float(re.search(r"final validation accuracy: ([\d.]+)", result.stdout).group(1))
    assert accuracy >= 0.95
    log = (run_dir / "slurm" / f"job-{job_id}.out").read_text()
    # the Ray head was started inside the allocation, on this job's own ports, and training ran there
    head = re.search(r"pipeline: job (\d+) segment 0 on (\S+); Ray head 127.0.0.2:(\d+)", log)
    assert head and int(head.group(1)) == job_id
    assert head.group(3) == job_ports(job_id)["RAY_GCS_PORT"]
    assert "Ray runtime started" in log and "final validation accuracy" in log
    assert "pipeline: driver exited 0" in log
    assert job_field(job_id, "JobState") == "COMPLETED" and job_field(job_id, "ExitCode") == "0:0"
    assert not os.path.exists(job_ports(job_id)["RAY_TMP_DIR"])  # cleaned up after a clean end


@pytest.mark.timeout(900)
def test_usr1_checkpoints_requeues_and_the_second_segment_resumes(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = submit(
        f"data.train={digits_dir}",
        f"run_dir={run_dir}",
        "cluster.node_ip=127.0.0.2",
        "train.max_steps=1000",
        "train.log_every=10",
        "tracking.wandb.mode=offline",
        "--wait",
        env={"WANDB_MODE": "offline"},
    )
    first_line = proc.stdout.readline()
    job_id = int(re.search(r"submitted Slurm job (\d+)", first_line).group(1))
    metrics = run_dir / "metrics.jsonl"
    wait_until(
        lambda: metrics.exists() and any(m["step"] >= 100 for m in read_jsonl(metrics)), 300, "step 100"
    )
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job_id)], check=True)
    wait_until(lambda: job_field(job_id, "Restarts") == "1", 120, "requeue")
    wait_until(lambda: job_field(job_id, "JobState") == "PENDING", 60, "pending after requeue")
    # A requeued job waits ~120 s (BeginTime); start it now. Not in the same second as the requeue:
    # slurmd refuses a job credential as old as the revocation of the previous one.
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert job_field(job_id, "JobState") == "COMPLETED" and job_field(job_id, "Restarts") == "1"

    events = read_jsonl(run_dir / "events.jsonl")
    (preempted,) = [e for e in events if e["event"] == "preempted"]
    (resume,) = [e for e in events if e["event"] == "resume"]
    assert resume["from_step"] == preempted["step"]  # the committed step, nothing lost
    assert (run_dir / "checkpoints" / f"step_{preempted['step']:08d}" / "MANIFEST.json").is_file()
    log = (run_dir / "slurm" / f"job-{job_id}.out").read_text()
    assert "preemption signal" in log and f"requeueing job {job_id}" in log
    assert f"pipeline: job {job_id} segment 1 on" in log  # SLURM_RESTART_COUNT=1
    assert log.count("pipeline: driver exited 0") == 1
    assert_one_wandb_run(run_dir, segments=2, last_step=1000)  # one W&B run across both segments
