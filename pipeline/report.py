"""`pipeline report RUN_DIR`: the run's curves as a PNG (from metrics.jsonl) and a one-screen summary
(from config.yaml, events.jsonl and the checkpoints), for people without a W&B dashboard."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError


def _rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line of a run that was killed mid-write
    return rows


def load(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(metrics rows, events, config) of a run dir; ConfigError (exit 2) when it has no metrics."""
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise ConfigError(
            f"{run_dir} has no metrics.jsonl: not a run dir of `pipeline train`, or nothing was logged yet"
        )
    rows = [r for r in _rows(metrics_path) if "step" in r]
    if not rows:
        raise ConfigError(
            f"{metrics_path} holds no metrics rows yet (the first is written at train.log_every)"
        )
    events = _rows(run_dir / "events.jsonl") if (run_dir / "events.jsonl").is_file() else []
    config = (
        yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    )
    return rows, events, config or {}


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, one value per step (a step logged twice keeps its last value)."""
    by_step = {r["step"]: r[key] for r in rows if isinstance(r.get(key), int | float)}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def env_steps_of(rows: list[dict[str, Any]], steps: list[int]) -> list[float]:
    """The environment steps at each of `steps`, interpolated between the logged train/env_steps
    (an eval row has the step but not the counter; the counter grows linearly between logs)."""
    import numpy as np

    known, counts = series(rows, "train/env_steps")
    return [float(v) for v in np.interp(steps, known, counts)] if known else []


def is_rl(rows: list[dict[str, Any]]) -> bool:
    """A run of an environment task: it logs episode returns against an environment-step counter."""
    return any("train/env_steps" in r for r in rows) and any(
        "train/episode_return" in r or "eval/return" in r for r in rows
    )


def plot(rows: list[dict[str, Any]], title: str, out: Path) -> Path:
    """Loss curves, eval metrics, throughput and LR, one panel each, as a PNG; an environment task's
    run gets a first panel of episode returns (training episodes, and evaluation with its std)
    against environment steps."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    keys = {k for r in rows for k, v in r.items() if isinstance(v, int | float)}
    rl = is_rl(rows)
    # perplexity is exp(eval/loss): on the loss's axis it would flatten the bpc and loss curves
    shown_apart = {"eval/samples", "eval/perplexity"} | (
        {"eval/return", "eval/return_std", "eval/episodes"} if rl else set()
    )
    panels = [
        ("training loss", sorted(k for k in keys if k.startswith("train/") and k.endswith("loss"))),
        ("eval", sorted(k for k in keys if k.startswith("eval/") and k not in shown_apart)),
        ("samples/s", ["train/samples_per_s"] if "train/samples_per_s" in keys else []),
        ("learning rate", sorted(k for k in keys if k.startswith("train/lr"))),
    ]
    panels = [(name, ks) for name, ks in panels if ks]
    if not rl:
        figure, axes = plt.subplots(
            len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False
        )
        step_axes = list(axes[:, 0])
    else:  # the returns on their own x axis (env steps) above the panels that share the step axis
        figure, axes = plt.subplots(len(panels) + 1, 1, figsize=(8, 2.6 * (len(panels) + 1)), squeeze=False)
        _returns_panel(axes[0, 0], rows)
        step_axes = list(axes[1:, 0])
        for ax in step_axes[1:]:
            ax.sharex(step_axes[0])
        for ax in step_axes[:-1]:
            ax.tick_params(labelbottom=False)
    for ax, (name, ks) in zip(step_axes, panels, strict=True):
        for key in ks:
            steps, values = series(rows, key)
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    step_axes[-1].set_xlabel("step")
    figure.suptitle(title)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def _returns_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    """train/episode_return (mean over the episodes finished in each log window) and eval/return
    (deterministic policy, +- its std over the episodes) against train/env_steps."""
    steps, values = series(rows, "train/episode_return")
    if steps:
        ax.plot(env_steps_of(rows, steps), values, label="train/episode_return")
    steps, values = series(rows, "eval/return")
    if steps:
        _, stds = series(rows, "eval/return_std")
        at = env_steps_of(rows, steps)
        errors = stds if len(stds) == len(values) else None
        ax.errorbar(at, values, yerr=errors, marker="o", markersize=4, capsize=3, label="eval/return")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def summary(
    run_dir: Path, rows: list[dict[str, Any]], events: list[dict[str, Any]], config: dict[str, Any]
) -> str:
    """One screen: what ran, how far, final and best metrics, what happened, where the weights are."""
    last = {}
    for row in rows:
        last.update({k: v for k, v in row.items() if isinstance(v, int | float)})
    kinds = Counter(e.get("event") for e in events)
    commits = sorted(
        p.name for p in (run_dir / "checkpoints").glob("step_*") if (p / "MANIFEST.json").is_file()
    )
    start = next((e for e in events if e.get("event") == "start"), {})
    model, task = config.get("model", {}), config.get("task", {})
    lines = [
        f"run           {run_dir}  ({config.get('name', '?')}, W&B run id {start.get('run_id', '?')})",
        f"model, task   {model.get('name', '?')} {model.get('args') or ''}, {task.get('name', 'classify')}",
        f"setup         {start.get('world_size', '?')} worker(s), ZeRO {start.get('zero_stage', '?')}, "
        f"{start.get('precision', '?')}",
        f"steps         {max(r['step'] for r in rows)} of {config.get('train', {}).get('max_steps', '?')}, "
        f"{(rows[-1].get('time', 0) - rows[0].get('time', 0)) / 60:.1f} min between the first and last log",
    ]
    for key in sorted(k for k in last if k.startswith(("train/loss", "eval/"))):
        if key == "eval/samples":
            continue
        _, values = series(rows, key)
        lines.append(f"  {key:24} last {last[key]:.4f}   min {min(values):.4f}   max {max(values):.4f}")
    happened = ", ".join(
        f"{kinds[k]} {k}"
        for k in ("restart", "resume", "preempted", "nonfinite", "skip_sample", "checkpoint_failed")
        if kinds[k]
    )
    if is_rl(rows):
        lines.append(returns_line(rows))
    lines.append(f"events        {happened or 'no restarts, resumes, preemptions, skips or failed saves'}")
    lines.append(f"checkpoints   {', '.join(commits) if commits else 'none'}")
    return "\n".join(lines)


def returns_line(rows: list[dict[str, Any]]) -> str:
    """An environment task's episode returns in one line: the last training window's and the best,
    the last evaluation's mean +- std, and the environment steps they were reached at."""
    parts = []
    steps, values = series(rows, "train/episode_return")
    if steps:
        at = env_steps_of(rows, steps)
        parts.append(
            f"train/episode_return {values[-1]:.1f} at {at[-1]:,.0f} env steps (best {max(values):.1f})"
        )
    steps, values = series(rows, "eval/return")
    if steps:
        by_step = {r["step"]: r for r in rows if "eval/return" in r}
        last = by_step[steps[-1]]
        std = last.get("eval/return_std")
        episodes = last.get("eval/episodes")
        parts.append(
            f"eval/return {values[-1]:.1f}"
            + (f" +- {std:.1f}" if isinstance(std, int | float) else "")
            + (f" over {episodes:.0f} episodes" if isinstance(episodes, int | float) else "")
            + f" at step {steps[-1]}"
        )
    return f"episode return {'; '.join(parts) if parts else 'no episode finished yet'}"


def sweep_report(sweep_dir: Path, out: Path) -> tuple[str, Path]:
    """`pipeline report SWEEP_DIR`: the sweep's metric of every trial over steps in one plot, and the
    summary (results.md once the sweep ended, else each trial's status from sweep.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state = json.loads((sweep_dir / "sweep.json").read_text())
    metric, trials = state["metric"], state["trials"]
    figure, ax = plt.subplots(figsize=(8, 4.5))
    for trial in trials:
        path = sweep_dir / trial["id"] / "metrics.jsonl"
        steps, values = series(_rows(path), metric) if path.is_file() else ([], [])
        if steps:
            params = ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in trial["params"].items())
            ax.plot(
                steps, values, marker="o", markersize=3, label=f"{trial['id']} ({params}) {trial['status']}"
            )
    ax.set_xlabel("step")
    ax.set_ylabel(f"{metric} ({state['mode']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    figure.suptitle(f"sweep {state['name']}: {sweep_dir}")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    results = sweep_dir / "results.md"
    if results.is_file():
        text = results.read_text().rstrip()
    else:
        text = "\n".join(
            f"{t['id']}  {t['status']:8} step {t['step']}  {metric} {t['metric']}" for t in trials
        )
    best = sweep_dir / "best.yaml"
    return text + (f"\nbest trial's config: {best}" if best.is_file() else ""), out


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
