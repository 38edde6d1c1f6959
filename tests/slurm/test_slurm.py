"""`pipeline submit slurm` against a real single-node Slurm (slurm/local-cluster.sh): Ray-on-Slurm
trains the smoke recipe. The preemption path (USR1 before the time limit -> checkpoint -> requeue -> the
next segment resumes, one W&B run) is test_slurm_time_limit.py's, with Slurm sending the signal."""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from pipeline.launch.slurm import job_ports
from tests.helpers import REPO, run_cli

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
