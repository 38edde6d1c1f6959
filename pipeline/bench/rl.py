"""`pipeline bench rl`: does PPO learn? Trains the RL recipes (configs/ppo-cartpole.yaml and
configs/ppo-acrobot.yaml, 2 Ray workers each), scores each trained policy as `pipeline eval` does
(env.eval_episodes = 20 episodes of the deterministic policy), and tables env steps, wall time, env
steps/s, the final evaluation return against the acceptance goal and against CleanRL's published
ppo.py figure, and the return curve (train/episode_return against train/env_steps, from metrics.jsonl).

RECIPE: cartpole acrobot (default: both). `--repeats N` trains seeds 1..N of each (seed 1 in
runs/<config>, seed s in runs/<config>-seed<s>) and adds the mean and std of their final returns.
Rows whose name says "goal" carry `ratio` = return / goal: >= 1 meets it for CartPole's positive
returns, <= 1 for Acrobot's negative ones (the row's name says which, and whether it was met).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.bench import find_config, row


@dataclass(frozen=True)
class Recipe:
    config: str  # configs/<config>.yaml
    env: str
    goal: float  # the acceptance goal for the mean evaluation return (higher is better)
    reference: tuple[float, float]  # CleanRL ppo.py at 500k env steps: mean +- std over seeds


# CleanRL's docs (rl-algorithms/ppo.md, "Experiment results"): ppo.py's average episodic return at
# 500k env steps, mean +- std over its benchmark seeds.
RECIPES = {
    "cartpole": Recipe("ppo-cartpole", "CartPole-v1", 475.0, (488.75, 18.40)),
    "acrobot": Recipe("ppo-acrobot", "Acrobot-v1", -100.0, (-82.48, 5.93)),
}
CURVE_POINTS = 10  # rows of the return curve per run


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if "step" in r]


def return_curve(rows: list[dict[str, Any]], points: int = CURVE_POINTS) -> list[tuple[int, float]]:
    """(train/env_steps, train/episode_return) at about `points` log steps spread evenly over the run,
    the last log always among them (the return is the mean over the episodes finished in each log
    window)."""
    curve = [
        (int(r["train/env_steps"]), float(r["train/episode_return"]))
        for r in rows
        if isinstance(r.get("train/env_steps"), int | float)
        and isinstance(r.get("train/episode_return"), int | float)
    ]
    if len(curve) <= points:
        return curve
    picks = {round(i * (len(curve) - 1) / (points - 1)) for i in range(points)}
    return [curve[i] for i in sorted(picks)]


def train_one(config: Path, run_dir: Path, seed: int, launcher: str) -> tuple[float, Any]:
    """`pipeline train CONFIG` (a new process) into `run_dir` (replaced): (wall s, the CompletedProcess)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"run_dir={run_dir}", "resume=never", f"seed={seed}", f"cluster.launcher={launcher}"]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", str(config), *overrides],
        cwd=config.parents[1],
        capture_output=True,
        text=True,
    )
    return time.perf_counter() - start, proc


def evaluate(run_dir: Path, config: Path) -> dict[str, Any]:
    """`pipeline eval RUN_DIR` (a new process): its metrics, the JSON line it prints last."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "eval", str(run_dir)],
        cwd=config.parents[1],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline eval {run_dir} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def goal_row(label: str, value: float, goal: float, what: str) -> dict[str, Any]:
    met = value >= goal
    sense = ">= 1" if goal > 0 else "<= 1"
    return row(
        f"{label}: {what} (goal >= {goal:g}, ratio {sense}: {'met' if met else 'MISSED'})",
        value,
        "return",
        goal,
    )


def run(
    recipes: list[str],
    runs: Path,
    repeats: int = 1,
    launcher: str = "ray",
    echo: Callable[[str], Any] = print,
) -> list[dict[str, Any]]:
    """Train and evaluate each recipe (seeds 1..repeats), run dirs under `runs` (replaced); the table."""
    unknown = [r for r in recipes if r not in RECIPES]
    assert not unknown, f"unknown recipes {unknown}"  # the CLI checks names before anything starts
    runs = runs.resolve()  # `pipeline train` runs in the checkout
    configs = {name: find_config(RECIPES[name].config) for name in recipes}  # all found before any run
    rows: list[dict[str, Any]] = []
    for name in recipes:
        recipe = RECIPES[name]
        finals: list[float] = []
        for seed in range(1, repeats + 1):
            run_dir = runs / (recipe.config if seed == 1 else f"{recipe.config}-seed{seed}")
            label = f"{name} seed {seed}"
            echo(f"{label}: pipeline train {configs[name]} run_dir={run_dir} ...")
            wall_s, proc = train_one(configs[name], run_dir, seed, launcher)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                rows.append(row(f"{label}: FAILED (exit {proc.returncode}), wall time", wall_s, "s"))
                continue
            history = read_rows(run_dir)
            env_steps = max(int(r["train/env_steps"]) for r in history if "train/env_steps" in r)
            loop_rates = [r["train/samples_per_s"] for r in history if "train/samples_per_s" in r]
            start = time.perf_counter()
            scored = evaluate(run_dir, configs[name])  # its newest checkpoint, env.eval_episodes = 20
            eval_s = time.perf_counter() - start
            final, std = float(scored["eval/return"]), float(scored["eval/return_std"])
            finals.append(final)
            reference, reference_std = recipe.reference
            rows += [
                row(f"{label}: env steps (vs CleanRL's 500k)", env_steps, "steps", 500_000),
                row(f"{label}: wall time of pipeline train (process start to exit)", wall_s, "s"),
                row(
                    f"{label}: env steps/s over the whole run (startup and evals included)",
                    env_steps / wall_s,
                    "steps/s",
                ),
                row(
                    f"{label}: env steps/s in the loop (median of the logged train/samples_per_s)",
                    statistics.median(loop_rates),
                    "steps/s",
                ),
                goal_row(
                    label,
                    final,
                    recipe.goal,
                    f"eval return, {scored['eval/episodes']:.0f} deterministic episodes, mean",
                ),
                row(f"{label}: eval return std over those episodes", std, "return"),
                row(
                    f"{label}: eval return vs CleanRL ppo.py ({reference:g} +- {reference_std:g} at 500k)",
                    final,
                    "return",
                    reference,
                ),
                row(f"{label}: pipeline eval time", eval_s, "s"),
            ]
            for steps, value in return_curve(history):
                rows.append(row(f"{label}:   train/episode_return at {steps:>7,} env steps", value, "return"))
            echo(
                f"{label}: eval return {final:.2f} +- {std:.2f} after {env_steps:,} env steps, {wall_s:.0f} s"
            )
        if len(finals) > 1:
            mean, spread = statistics.mean(finals), statistics.stdev(finals)
            rows.append(
                goal_row(
                    f"{name} over {len(finals)} seeds", mean, recipe.goal, "mean of the final eval returns"
                )
            )
            rows.append(
                row(f"{name} over {len(finals)} seeds: std of the final eval returns", spread, "return")
            )
    return rows
