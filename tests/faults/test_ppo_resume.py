"""Kill-and-resume equality for PPO (issue 17): a SIGKILLed Ray worker and a SIGTERMed driver each
resume to the run that was never interrupted, bitwise per update (losses, episode returns and counts,
env steps) and in the final weights; a checkpoint of 2 workers resumed by 1 continues.

One unbroken 2-worker run (the local launcher) is the reference of every test here: the Ray launcher's
2 gloo workers compute the same numbers (same seeds, one thread each), which the kill test asserts.
configs/ppo-cartpole.yaml made small: 24 rollouts of 32 steps x 2 CartPoles per worker."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from pipeline import config, launch
from pipeline.checkpoint import commit, export
from pipeline.launch.plan import make_plan
from tests.faults.test_ray_faults import wait_for_step
from tests.helpers import REPO, assert_one_wandb_run, read_jsonl, run_cli

pytestmark = pytest.mark.faults

RECIPE = "configs/ppo-cartpole.yaml"
MAX_STEPS = 24  # the LR anneals over these: every run here has the same
ROLLOUT = 32 * 2  # env steps per worker and step: task.args.num_steps x env.num_envs
SMALL = [
    f"train.max_steps={MAX_STEPS}",
    "task.args.num_steps=32",
    "env.num_envs=2",
    "env.eval_episodes=4",
    "train.log_every=1",
    "train.eval_every=0",
    "checkpoint.every=4",
    "checkpoint.keep_last=10",
    "precision=fp32",
]
LOCAL = [*SMALL, "cluster.launcher=local"]
# what the wall clock sets; every other metric of a step is the computation's
TIMING = {"time", "train/samples_per_s", "train/data_wait_frac", "sys/peak_rss_mb"}
# the point of the tests, named so a missing one fails rather than compares two absences
MUST = (
    "train/loss",
    "train/policy_loss",
    "train/value_loss",
    "train/episode_return",
    "train/episode_return/rank0",
    "train/episode_return/rank1",
    "train/episodes",
    "train/env_steps",
)


def step_metrics(run_dir):
    """{step: its train/ metrics less the timing ones}, every step logged exactly once."""
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))  # once each, in order
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING} for r in rows}


def assert_same_run(run_dir, reference):
    got, want = step_metrics(run_dir), step_metrics(reference)
    for step in want:
        assert all(k in want[step] for k in MUST[:3]) and "train/env_steps" in want[step]
        assert got[step] == want[step], f"step {step}: " + ", ".join(
            f"{k} {got[step].get(k)} != {want[step].get(k)}"
            for k in sorted(set(got[step]) | set(want[step]))
            if got[step].get(k) != want[step].get(k)
        )  # == on floats: bitwise
    assert all(any(k in row for row in want.values()) for k in MUST)  # each compared at some step
    assert sum("train/episodes" in row for row in want.values()) > MAX_STEPS // 2  # episodes compared
    final = [
        export.consolidated_state_dict(d / "checkpoints" / f"step_{MAX_STEPS:08d}")
        for d in (run_dir, reference)
    ]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def events(run_dir, kind):
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == kind]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """The reference: 2 workers, never interrupted (its checkpoints every 4 steps feed the world-size
    test)."""
    run_dir = tmp_path_factory.mktemp("ppo") / "unbroken"
    final = launch.train(make_plan(config.load(RECIPE, [*LOCAL, f"run_dir={run_dir}"])))
    assert final["step"] == MAX_STEPS
    return run_dir


@pytest.mark.timeout(600)
def test_killed_ray_worker_restarts_and_resumes_bitwise_like_the_unbroken_run(unbroken, tmp_path):
    run_dir = tmp_path / "killed"
    kill_step = 11  # rank 1 dies at the start of step 11: steps 9 and 10 are done twice
    killed = run_cli(
        "train",
        RECIPE,
        *SMALL,
        "cluster.launcher=ray",
        "cluster.num_workers=2",
        "cluster.max_failures=1",
        f"run_dir={run_dir}",
        env={"PIPELINE_FAULTS": f"kill@{kill_step}:1"},  # SIGKILL of rank 1's process
    )
    assert killed.returncode == 0, killed.stderr[-3000:]
    (restart,) = events(run_dir, "restart")
    (resume,) = events(run_dir, "resume")
    assert restart["attempt"] == 1
    assert resume["from_step"] in (4, 8)  # the newest commit before the kill (8 unless still writing)
    assert_same_run(run_dir, unbroken)


@pytest.mark.timeout(600)
def test_sigterm_exits_75_and_the_rerun_resumes_bitwise_like_the_unbroken_run(unbroken, tmp_path):
    """The local launcher (tests/faults/test_ray_faults.py covers the Ray driver's SIGTERM path: the
    same STOP agreement in the workers); one offline W&B run across the preemption."""
    run_dir = tmp_path / "stopped"
    args = ["train", RECIPE, *LOCAL, "tracking.wandb.mode=offline", f"run_dir={run_dir}"]
    env = {"WANDB_MODE": "offline"}
    with open(tmp_path / "stopped.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args],
            cwd=REPO,
            stdout=log,
            stderr=log,
            env={**os.environ, **env},
        )
        wait_for_step(run_dir, 3, proc)
        os.kill(proc.pid, signal.SIGTERM)  # the driver only, as Slurm or Kubernetes would
        assert proc.wait(timeout=300) == 75, (tmp_path / "stopped.log").read_text()[-3000:]
    (preempted,) = events(run_dir, "preempted")
    stop = preempted["step"]
    assert 3 <= stop < MAX_STEPS  # mid-way: a stop in the final save would prove nothing
    assert (run_dir / "checkpoints" / f"step_{stop:08d}" / "MANIFEST.json").is_file()

    resumed = run_cli(*args, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (resume,) = events(run_dir, "resume")
    assert resume["from_step"] == stop  # zero lost steps
    assert_same_run(run_dir, unbroken)
    assert_one_wandb_run(run_dir, segments=2, last_step=MAX_STEPS)


@pytest.mark.timeout(600)
def test_a_2_worker_checkpoint_resumed_by_1_worker_continues(unbroken, tmp_path):
    """What pipeline/training/experience.py says changes with the world size: new episodes (seeded by
    the resume step), the weights, optimizer, step and env-step counter carried over."""
    run_dir = tmp_path / "run"
    shutil.copytree(unbroken, run_dir)  # the unbroken run as it stood after its commit of step 12
    for ckpt in commit.committed(run_dir / "checkpoints"):
        if commit.read_manifest(ckpt)["step"] > 12:
            shutil.rmtree(ckpt)
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "events.jsonl").unlink()
    before = {r["step"]: r for r in read_jsonl(unbroken / "metrics.jsonl") if "train/loss" in r}

    one = run_cli("train", RECIPE, *LOCAL, "cluster.num_workers=1", f"run_dir={run_dir}")
    assert one.returncode == 0, one.stderr[-3000:]
    assert "new episodes (another world size)" in one.stdout
    (resume,) = events(run_dir, "resume")
    assert resume["from_step"] == 12
    commits = {
        e["step"]: e["weights"]
        for e in read_jsonl(unbroken / "events.jsonl")
        if e["event"] == "checkpoint_commit"
    }
    assert resume["weights"] == pytest.approx(commits[12], rel=1e-9)  # the saved weights, loaded
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(13, MAX_STEPS + 1))
    # the env-step counter continues from the checkpoint's: one worker's rollout per step from there
    assert [r["train/env_steps"] for r in rows] == [
        before[12]["train/env_steps"] + ROLLOUT * (r["step"] - 12) for r in rows
    ]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows)
    assert "train/episode_return/rank1" not in {k for r in rows for k in r}  # one rank now
    assert rows[-1]["train/lr"] == 0.0  # the LR schedule ran on to its end at max_steps
