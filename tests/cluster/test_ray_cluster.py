"""`pipeline submit ray` against a real 2-node Ray cluster on loopback (cluster/local-2node.sh: head
127.0.0.2, worker 127.0.0.3): the smoke recipe trains on both nodes; re-submitting attaches to a
running job and restarts a failed one, which resumes; a killed worker raylet costs a restart from the
last checkpoint, not the run; a user's package and file, importable only on the submitting machine,
travel with the job and train on both nodes."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from pipeline.net import free_port
from tests.helpers import REPO, read_jsonl, run_cli

pytestmark = pytest.mark.cluster

SCRIPT = REPO / "cluster" / "local-2node.sh"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("ray-2node")
    env = {
        **os.environ,
        "PIPELINE_RAY_STATE": str(state),
        "RAY_AUTH_TOKEN_PATH": str(state / "auth_token"),  # the script makes it; clients read it
        "RAY_HEAD_PORT": str(free_port("127.0.0.2")),
        "RAY_DASHBOARD_PORT": str(free_port("127.0.0.2")),
    }
    subprocess.run([str(SCRIPT), "start"], env=env, check=True, timeout=300)
    yield {"env": env, "address": f"http://127.0.0.2:{env['RAY_DASHBOARD_PORT']}"}
    subprocess.run([str(SCRIPT), "stop"], env=env, timeout=120)


def submit_args(cluster, digits_dir, run_dir, *extra):
    return [
        "submit",
        "ray",
        "configs/smoke.yaml",
        "--address",
        cluster["address"],
        f"data.train={digits_dir}",
        f"run_dir={run_dir}",
        "tracking.wandb.mode=disabled",
        *extra,
    ]


def submit(cluster, *args, env=None, timeout_s=600):
    return run_cli(*args, env={**cluster["env"], **(env or {})}, timeout_s=timeout_s)


def accuracy(stdout):
    return float(re.search(r"final validation accuracy: ([\d.]+)", stdout).group(1))


@pytest.mark.timeout(600)
def test_submit_trains_on_both_nodes_and_a_resubmission_attaches(cluster, digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = submit_args(cluster, digits_dir, run_dir)
    first = submit(cluster, *args, "--no-wait")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "submitted Ray job pipeline-smoke-" in first.stdout
    again = submit(cluster, *args)  # the same run while it is active: follow it, do not start another
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "is already RUNNING: following it" in again.stdout or "is already PENDING" in again.stdout
    assert accuracy(again.stdout) >= 0.95
    (start,) = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "start"]
    assert sorted(set(start["nodes"])) == ["127.0.0.2", "127.0.0.3"]  # one worker on each node
    assert start["niceness"] == [0, 0]  # the job's runtime env overrides Ray's worker niceness of 15


@pytest.mark.timeout(600)
def test_a_failed_job_resubmitted_resumes_from_its_run_dir(cluster, digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = submit_args(cluster, digits_dir, run_dir, "train.max_steps=60", "checkpoint.every=10")
    failed = submit(cluster, *args, env={"PIPELINE_FAULTS": "kill@25:1"})  # max_failures=0: fails
    assert failed.returncode == 1, failed.stdout[-3000:]
    assert re.search(r"\[ray\] job pipeline-smoke-\S+: FAILED", failed.stdout)
    resubmitted = submit(cluster, *args)
    assert resubmitted.returncode == 0, resubmitted.stdout[-3000:] + resubmitted.stderr[-3000:]
    assert "ended FAILED before: submitting it again (it resumes)" in resubmitted.stdout
    (resume,) = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert resume["from_step"] == 20  # the last commit before the kill at step 25
    steps = [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 60


@pytest.mark.timeout(900)
def test_killing_the_worker_nodes_raylet_costs_a_restart_not_the_run(cluster, digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = submit_args(
        cluster,
        digits_dir,
        run_dir,
        "train.max_steps=600",
        "train.log_every=10",
        "checkpoint.every=50",
        "cluster.max_failures=1",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO,
        env=cluster["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and any(m["step"] >= 120 for m in read_jsonl(metrics))):
        assert time.monotonic() < deadline and proc.poll() is None, "step 120 not reached"
        time.sleep(0.5)
    worker_node = psutil.Process(
        int((REPO / cluster["env"]["PIPELINE_RAY_STATE"] / "worker.pid").read_text())
    )
    (raylet,) = [p for p in worker_node.children(recursive=True) if p.name() == "raylet"]
    raylet.send_signal(signal.SIGKILL)  # the worker node is gone (its `ray start --block` exits too)
    worker_node.wait(timeout=60)
    subprocess.run([str(SCRIPT), "start-worker"], env=cluster["env"], check=True, timeout=300)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert accuracy(out) >= 0.95
    events = read_jsonl(run_dir / "events.jsonl")
    (restart,) = [e for e in events if e["event"] == "restart"]
    (resume,) = [e for e in events if e["event"] == "resume"]
    assert restart["attempt"] == 1 and resume["from_step"] >= 100  # the last commit before the kill
    steps = [m["step"] for m in read_jsonl(metrics) if "train/loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 600  # resumed, never logged twice


@pytest.mark.timeout(600)
def test_users_code_travels_with_the_job_to_both_nodes(cluster, digits_dir, tmp_path):
    """The model by module path (its package `userpkg` is on the submitter's PYTHONPATH only), the
    task by file path: the nodes' Python has neither; the job ships both (Ray's py_modules)."""
    userpkg = REPO / "tests" / "userpkg"
    run_dir = tmp_path / "run"
    args = submit_args(
        cluster,
        digits_dir,
        run_dir,
        "model.name=userpkg.models:TinyNet",
        "model.args={hidden: 32}",
        f"task.name={userpkg / 'userpkg' / 'tasks.py'}:SmoothClassify",
        "train.max_steps=40",
        "train.eval_every=0",
        "optim.warmup_steps=4",
    )
    proc = submit(cluster, *args, env={"PYTHONPATH": str(userpkg)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shipped = re.search(r"shipping your code with the job: (.*)", proc.stdout).group(1).split(", ")
    assert str(userpkg / "userpkg") in shipped and any("_pipeline_file_" in m for m in shipped)
    (start,) = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "start"]
    assert sorted(set(start["nodes"])) == ["127.0.0.2", "127.0.0.3"]  # each node built the user's model
    ran = (run_dir / "config.yaml").read_text()
    assert "name: userpkg.models:TinyNet" in ran and "name: _pipeline_file_" in ran  # the wrapped file
    final = read_jsonl(run_dir / "metrics.jsonl")[-1]
    assert final["step"] == 40 and 0 < final["eval/confidence"] <= 1  # the user's task's own metric


@pytest.mark.timeout(600)
def test_a_submitted_sweep_runs_its_trials_on_the_cluster(cluster, digits_dir, tmp_path):
    # optuna's TPE, one trial a batch: the second is asked once the first has ended
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        "sweep:\n  parameters:\n    optim.lr: {loguniform: [3.0e-3, 1.0e-2]}\n  search: optuna\n"
        "  num_trials: 2\n  max_concurrent: 1\n"
    )
    run_dir = tmp_path / "sweep"
    args = submit_args(cluster, digits_dir, run_dir, "train.max_steps=30", "--sweep", str(sweep_file))
    proc = submit(cluster, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| 1 | trial_000" in proc.stdout  # the sweep's table, printed by the job's driver
    for trial in ("trial_0000", "trial_0001"):
        (start,) = [e for e in read_jsonl(run_dir / trial / "events.jsonl") if e["event"] == "start"]
        assert sorted(set(start["nodes"])) == ["127.0.0.2", "127.0.0.3"]  # a trial's workers on both nodes
    assert (run_dir / "results.md").is_file() and (run_dir / "best.yaml").is_file()
    state = json.loads((run_dir / "sweep.json").read_text())
    assert [t["status"] for t in state["trials"]] == ["done", "done"]
    assert all(3e-3 <= t["params"]["optim.lr"] <= 1e-2 and t["metric"] is not None for t in state["trials"])
