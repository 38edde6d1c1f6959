"""`pipeline eval` and `pipeline export` of RL runs, and the continuous-action (box) path: two tiny PPO
runs (CartPole-v1 with 2 local workers, Pendulum-v1 with 1), trained side by side once per module.

The exported policy (FILE.policy.pt2) is run in a fresh interpreter that never imports the pipeline,
on the evaluation episodes' own seeds: its returns are `pipeline eval`'s, which are the run's own
final evaluation (fp32; episode e seeded by envs.env_seed(seed, EVAL_STREAM, e))."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import api, config, envs
from pipeline.checkpoint import commit, export, policy
from pipeline.tasks.base import forward_only
from tests.helpers import REPO, read_jsonl, run_cli

pytest.importorskip("gymnasium")

TINY = [
    "cluster.launcher=local",
    "tracking.wandb.mode=disabled",
    "task.args.num_steps=16",
    "train.log_every=1",
    "train.eval_every=0",  # the final evaluation only
    "checkpoint.every=1",
    "checkpoint.keep_last=5",
]
RUNS = {
    "cartpole": ["env.eval_episodes=5", "train.max_steps=2"],
    "pendulum": [
        "name=ppo-pendulum",
        "env.id=Pendulum-v1",
        "env.max_episode_steps=50",
        "env.eval_episodes=3",
        "cluster.num_workers=1",
        "train.max_steps=3",
        "optim.lr=0.003",
    ],
}

# Runs in a fresh interpreter: plain torch + gymnasium, stepping the episodes as envs.run_episodes does
# (all in one batch, the observations of the live episodes stacked), so the policy sees the same inputs.
STANDALONE = """
import json, sys
import gymnasium as gym, numpy as np, torch

results = []
for job in json.loads(sys.argv[1]):
    policy = torch.export.load(job["policy"]).module()
    env = job["env"]
    limit = {"max_episode_steps": env["max_episode_steps"]} if env["max_episode_steps"] else {}
    kwargs = dict(env["args"], **limit)
    copies = [gym.make(env["id"], **kwargs) for _ in job["seeds"]]
    obs = np.stack([c.reset(seed=s)[0] for c, s in zip(copies, job["seeds"])]).astype(np.float32)
    returns, live = [0.0] * len(copies), list(range(len(copies)))
    while live:
        with torch.no_grad():
            actions = policy(torch.as_tensor(obs[live])).numpy()
        still = []
        for j, i in enumerate(live):
            action = actions[j].item() if actions.ndim == 1 else actions[j]  # an int, or a float32 array
            o, reward, terminated, truncated, _ = copies[i].step(action)
            returns[i] += float(reward)
            obs[i] = o
            if not (terminated or truncated):
                still.append(i)
        live = still
    results.append({"returns": returns, "batch_actions": policy(torch.as_tensor(job["batch"])).tolist()})
assert "pipeline" not in sys.modules and "deepspeed" not in sys.modules, sorted(sys.modules)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: run dir} of both runs, trained concurrently (their startup dominates)."""
    root = tmp_path_factory.mktemp("ppo")
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline",
                "train",
                "configs/ppo-cartpole.yaml",
                f"run_dir={root / name}",
                *TINY,
                *extra,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, extra in RUNS.items()
    }
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {out[-3000:]}"
    return {name: root / name for name in RUNS}


def final_eval(run_dir: Path) -> dict:
    (row,) = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval/return" in r]
    return row


def test_eval_prints_the_runs_own_final_evaluation(runs):
    run = runs["cartpole"]
    proc = run_cli("eval", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    *human, last = proc.stdout.strip().splitlines()
    scored, in_run = json.loads(last), final_eval(run)
    keys = ("eval/return", "eval/return_std", "eval/length", "eval/episodes")
    # the same 5 episodes (seeded by index) of the same fp32 policy: 2 ranks in the run, 1 process here
    assert scored["step"] == 2 and {k: scored[k] for k in keys} == {k: in_run[k] for k in keys}
    assert human == [
        f"return {in_run['eval/return']:.2f} +- {in_run['eval/return_std']:.2f} over 5 episodes "
        "(deterministic policy)"
    ]
    # the continuous run: returns are float sums, added up in another order over ranks
    scored, in_run = api.evaluate(runs["pendulum"]), final_eval(runs["pendulum"])
    assert scored["step"] == 3 and scored["eval/episodes"] == in_run["eval/episodes"] == 3
    assert scored["eval/return"] == pytest.approx(in_run["eval/return"], rel=1e-12)
    assert scored["eval/return_std"] == pytest.approx(in_run["eval/return_std"], rel=1e-9)


def test_pendulum_trains_with_box_actions(runs):
    rows = [r for r in read_jsonl(runs["pendulum"] / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    names = ("loss", "policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction")
    assert all(math.isfinite(r[f"train/{n}"]) for r in rows for n in names)
    first, last = (
        export.consolidated_state_dict(runs["pendulum"] / "checkpoints" / f"step_{s:08d}") for s in (1, 3)
    )
    changed = {k for k in first if not torch.equal(first[k], last[k])}
    assert {"log_std", "policy_head.weight", "value_head.weight"} <= changed  # the Gaussian's too


def test_exported_policy_runs_without_the_pipeline(runs, tmp_path):
    outs = {name: tmp_path / f"{name}.pt" for name in runs}
    proc = run_cli("export", str(runs["cartpole"]), "--out", str(outs["cartpole"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"policy: {outs['cartpole']}.policy.pt2" in proc.stdout
    api.export(runs["pendulum"], outs["pendulum"])

    rng = np.random.default_rng(0)
    jobs, expected = [], {}
    for name, run in runs.items():
        meta = json.loads(Path(f"{outs[name]}.json").read_text())
        assert meta["policy"]["file"] == f"{name}.pt.policy.pt2"
        env = meta["policy"]["env"]
        # the pipeline's own deterministic act() on a batch of observations
        batch = rng.normal(size=(32, *meta["model"]["input_shape"])).astype(np.float32) * 2
        ckpt = commit.find(run)
        eager = policy.load_policy(ckpt, {"model": export.consolidated_state_dict(ckpt)})
        acted = eager.task.act(
            forward_only(dict(eager.parts)),
            torch.as_tensor(batch),
            action_space=meta["model"]["action_space"],
            deterministic=True,
        )
        space = meta["model"]["action_space"]
        expected[name] = [envs.to_env_action(a, space) for a in acted.numpy()]
        seed = config.load(run / "config.yaml").seed
        seeds = [envs.env_seed(seed, envs.EVAL_STREAM, e) for e in range(env["eval_episodes"])]
        jobs.append(
            {"policy": f"{outs[name]}.policy.pt2", "env": env, "seeds": seeds, "batch": batch.tolist()}
        )

    proc = subprocess.run(
        [sys.executable, "-c", STANDALONE, json.dumps(jobs)], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = dict(zip(runs, json.loads(proc.stdout), strict=True))
    for name in runs:
        # the same actions as act() (box: its mean, clipped to the bounds as the environment gets it)
        got = np.asarray(results[name]["batch_actions"])
        assert np.array_equal(
            got.astype(np.float32 if got.dtype.kind == "f" else np.int64), np.stack(expected[name])
        )
        # and the same episodes as `pipeline eval`, episode by episode in the run's final evaluation
        returns = np.asarray(results[name]["returns"])
        in_run = final_eval(runs[name])
        assert len(returns) == in_run["eval/episodes"]
        assert returns.mean() == pytest.approx(in_run["eval/return"], rel=1e-12)
        assert returns.std() == pytest.approx(in_run["eval/return_std"], rel=1e-9, abs=1e-9)
    # `pipeline eval ... env.eval_episodes=2` scores the first 2 of those episodes
    scored = api.evaluate(runs["cartpole"], ["env.eval_episodes=2"])
    assert scored["eval/episodes"] == 2 and scored["eval/return"] == np.mean(
        results["cartpole"]["returns"][:2]
    )


def test_help_names_the_policy_program():
    from typer.testing import CliRunner

    from pipeline.__main__ import app

    result = CliRunner().invoke(app, ["export", "--help"], terminal_width=200)
    assert result.exit_code == 0 and "policy.pt2" in result.output and "torch.export" in result.output
