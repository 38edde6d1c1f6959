"""`pipeline sweep` with Ray Tune on a real Ray cluster (issue 20): 3 trials of the smoke CNN (local-launcher
runs, so that each starts in seconds), one at a time, ASHA over evaluations every 200 steps. The sweep
driver is SIGKILLed once one trial has finished and another has committed a checkpoint mid-run; the
same command then continues: the finished trial is not run again, the interrupted one resumes from its
checkpoint (a `resume` event), the table covers all 3, and each trial is one W&B run (offline) in the
sweep's group, tagged with its parameters, across the interruption. best.yaml holds the best trial's
parameters and a run dir of its own."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.helpers import REPO, read_jsonl, run_cli, wandb_segments

pytestmark = pytest.mark.integration

STEPS = 400  # ~10 s of training a trial: a killed driver's trials (which stop ~1 s after it) die mid-run
EVERY = 100
RUNG = 2 * EVERY  # ASHA's one rung
SWEEP = {
    # a grid run one at a time; ASHA's one rung is at step 200, two evaluations in: a trial has committed
    # its step-100 checkpoint ~2.5 s before ASHA can stop it, so the driver is killed in the second trial
    # whatever its accuracy (with the rung at the first checkpoint, a trial ASHA stops there leaves no
    # moment to kill it mid-run: the suite once missed it on a faster machine)
    "parameters": {"optim.lr": {"grid": [3.0e-3, 1.0e-2, 1.0e-5]}, "model.args.dropout": {"choice": [0.2]}},
    "search": "grid",
    "max_concurrent": 1,
    "scheduler": {"asha": {"grace_steps": RUNG, "reduction_factor": 2}},
}


def trials(sweep_dir):
    path = sweep_dir / "sweep.json"
    return json.loads(path.read_text())["trials"] if path.is_file() else []


def events(run_dir, kind):
    path = run_dir / "events.jsonl"
    return [e for e in read_jsonl(path) if e["event"] == kind] if path.is_file() else []


def last_step(run_dir):
    path = run_dir / "metrics.jsonl"
    return max((r["step"] for r in read_jsonl(path) if "step" in r), default=0) if path.is_file() else 0


def interrupted_point(sweep_dir):
    """One trial finished, another running with a committed checkpoint, before ASHA's rung: the moment
    to kill the driver."""
    state = trials(sweep_dir)
    finished = [t for t in state if t["status"] in ("done", "stopped")]
    midway = [
        t
        for t in state
        if t["status"] == "running"
        and any((sweep_dir / t["id"] / "checkpoints").glob("step_*"))
        and last_step(sweep_dir / t["id"]) < RUNG
    ]
    return bool(finished and midway)


@pytest.mark.serial  # kills the driver inside a window between a checkpoint and an ASHA rung
@pytest.mark.timeout(900)
def test_a_killed_sweep_continues_its_trials_and_ends_with_every_trial_ranked(
    digits_dir, tmp_path, monkeypatch
):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the suite disables W&B; its offline files are checked
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"sweep": SWEEP}, sort_keys=False))
    sweep_dir = tmp_path / "sweep"
    args = [
        "sweep",
        "configs/smoke.yaml",
        str(sweep_file),
        f"data.train={digits_dir}",
        f"run_dir={sweep_dir}",
        f"train.max_steps={STEPS}",
        f"train.eval_every={EVERY}",
        f"checkpoint.every={EVERY}",
        "optim.warmup_steps=2",
        "tracking.wandb.mode=offline",
        "name=lrsweep",
        "cluster.launcher=local",  # trials as local processes: Tune on Ray schedules them, startup ~5 s
    ]
    with open(tmp_path / "first.log", "wb") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 400
        while not interrupted_point(sweep_dir) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert interrupted_point(sweep_dir), trials(sweep_dir)
        before = {t["id"]: t for t in trials(sweep_dir)}
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    finished = [i for i, t in before.items() if t["status"] in ("done", "stopped")]
    starts = {i: len(events(sweep_dir / i, "start")) for i in finished}
    time.sleep(3)  # the killed driver's trials end with their cluster (their parent died)
    # running when the driver died, their runs cut short (a run can also end in the moment before the
    # sweep records it: the re-run then finds it finished)
    interrupted = [
        i for i, t in before.items() if t["status"] == "running" and not events(sweep_dir / i, "finish")
    ]
    assert interrupted, before

    again = run_cli(*args, timeout_s=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    state = {t["id"]: t for t in trials(sweep_dir)}
    assert sorted(state) == ["trial_0000", "trial_0001", "trial_0002"]
    assert all(t["status"] in ("done", "stopped") and t["metric"] is not None for t in state.values())
    # the driver died in trial_0001 before its rung; ASHA's rungs start afresh when a sweep continues, so
    # the resumed trial_0001 passes the empty rung and trial_0002 (lr 1e-5) stops behind it
    assert interrupted == ["trial_0001"], before
    stopped = [i for i, t in state.items() if t["status"] == "stopped"]
    assert stopped == ["trial_0002"] and state["trial_0002"]["step"] == RUNG, state
    for i in finished:  # kept, not run again
        assert state[i] == before[i]
        assert len(events(sweep_dir / i, "start")) == starts[i]
    for i in interrupted:  # continued from its own checkpoint
        resumes = events(sweep_dir / i, "resume")
        assert resumes and resumes[0]["from_step"] >= EVERY, i

    table = (sweep_dir / "results.md").read_text()
    assert all(i in table for i in state) and "| 1 | " in table
    best = max(state.values(), key=lambda t: t["metric"])
    assert f"| 1 | {best['id']} |" in table
    for i, trial in state.items():  # one W&B run per trial, across the interruption, in the group
        segments = wandb_segments(sweep_dir / i)
        assert segments and len({s["run_id"] for s in segments}) == 1, i
        assert {s["group"] for s in segments} == {"lrsweep"}
        assert f"model.args.dropout={trial['params']['model.args.dropout']}" in segments[0]["tags"]
        assert "optim" in segments[0]["config"]

    best_cfg = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best_cfg["optim"]["lr"] == pytest.approx(best["params"]["optim.lr"])
    assert best_cfg["run_dir"] == str(sweep_dir / "best")
