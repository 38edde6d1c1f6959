"""`pipeline bench NAME`: measurements printed as ratio tables, side by side in one run.

Every table is a list of rows {"name", "value", "unit", "baseline", "ratio"} (`--json FILE` writes
them); `baseline` is what the value is compared with in the same run, `ratio` = value / baseline.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

# name: what it measures (one line each; `pipeline bench --help` lists them)
BENCHMARKS = {
    "overhead": "steady-state s/step of `pipeline train` (ZeRO stages) against a plain DDP loop, input stall",
    "startup": "`pipeline train` to its first step done, and how those seconds split",
    "loader": "our stream against a raw tar read, and its decode rate against the cores' own",
    "checkpoint": "checkpoint commit MB/s against dd, and the loop time lost per save",
    "gpu": "ResNet-50 img/s and MFU in memory and through the pipeline, the LSTM recipe (needs CUDA)",
    "recipes": "does each recipe learn (MNIST-5k; LMs: stdlib text): its eval against its goal, wall time",
    "rl": "PPO on CartPole-v1 and Acrobot-v1: eval return vs goal and CleanRL, env steps/s, curve",
    "memory": "ResNet-50 at 224 px with and without activation checkpointing: peak memory, s/step",
    "compile": "s/step of the CNN, ResNet-18 and LSTM recipes with and without train.compile, compile time",
    "sweep": "a 6-trial Ray Tune sweep of the CNN: best trial against the default, best.yaml re-trained",
}
# The checkout this package runs from, when it does: the recipes' configs/ live there, not in the package.
REPO = Path(__file__).resolve().parents[2]


class BenchError(ValueError):
    """A benchmark cannot run here (no CUDA, no recipe configs): the CLI exits 2 with the message."""


def find_config(name: str) -> Path:
    """`configs/NAME.yaml` of the checkout this package runs from, else of the current directory."""
    for root in (REPO, Path.cwd()):
        if (path := root / "configs" / f"{name}.yaml").is_file():
            return path
    raise BenchError(
        f"this benchmark trains the recipe configs/{name}.yaml, found neither in {REPO} nor in "
        f"{Path.cwd()}: run it from a checkout of the repository"
    )


def row(name: str, value: float, unit: str, baseline: float | None = None) -> dict[str, Any]:
    ratio = value / baseline if baseline else None
    return {"name": name, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def format_table(title: str, rows: list[dict[str, Any]]) -> str:
    def number(x: float | None) -> str:
        if x is None:
            return ""
        return f"{x:,.4f}" if abs(x) < 1 else f"{x:,.3f}" if abs(x) < 100 else f"{x:,.0f}"

    width = max(len(r["name"]) for r in rows) if rows else 10
    lines = [title, f"{'measure':{width}}  {'value':>10}  {'unit':8}  {'baseline':>10}  {'ratio':>6}"]
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else ""
        value, baseline = number(r["value"]), number(r["baseline"])
        lines.append(f"{r['name']:{width}}  {value:>10}  {r['unit']:8}  {baseline:>10}  {ratio:>6}")
    return "\n".join(lines)
