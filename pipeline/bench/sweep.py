"""`pipeline bench sweep`: does a sweep find a better config than the default, and does its best config
train again to the same figure? On MNIST-5k, three `pipeline` processes in a row:

1. the CNN recipe as shipped (configs/cnn-mnist5k.yaml), evaluated every 50 steps like the trials;
2. `pipeline sweep` of it over configs/sweeps/cnn-lr-dropout.yaml (6 trials of optim.lr and
   model.args.dropout, 2 at a time, ASHA), with results.md, report.png and best.yaml;
3. `pipeline train SWEEP_DIR/best.yaml`: the best trial's config as a run of its own.

Rows: the best trial's final eval/accuracy against the default's, the re-trained best against the
trial, the trials ASHA stopped early, and the sweep's wall time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.bench import REPO, BenchError, find_config, row

RECIPE = "cnn-mnist5k"
SWEEP_FILE = "configs/sweeps/cnn-lr-dropout.yaml"
COMMON = ["train.eval_every=50", "checkpoint.every=100", "tracking.wandb.mode=disabled"]


def final_accuracy(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["eval/accuracy"] for r in rows if "eval/accuracy" in r][-1]


def _pipeline(*args: str, echo: Callable[[str], Any]) -> float:
    """Run `python -m pipeline ARGS` in the checkout; its wall time. BenchError with its tail on failure."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"pipeline {args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    echo(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else f"pipeline {args[0]} done")
    return time.perf_counter() - start


def run(data: Path, runs: Path, echo: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    config = str(find_config(RECIPE))
    default_dir, sweep_dir = runs / "sweep-default", runs / "sweep-cnn"
    for old in (default_dir, sweep_dir):
        shutil.rmtree(old, ignore_errors=True)
    _pipeline("train", config, f"data.train={data}", f"run_dir={default_dir}", *COMMON, echo=echo)
    sweep_s = _pipeline(
        "sweep",
        config,
        str(REPO / SWEEP_FILE),
        f"data.train={data}",
        f"run_dir={sweep_dir}",
        *COMMON,
        echo=echo,
    )
    _pipeline("report", str(sweep_dir), echo=echo)
    trials = json.loads((sweep_dir / "sweep.json").read_text())["trials"]
    best = max((t for t in trials if t["metric"] is not None), key=lambda t: t["metric"])
    _pipeline("train", str(sweep_dir / "best.yaml"), echo=echo)
    echo((sweep_dir / "results.md").read_text())
    stopped = [t for t in trials if t["status"] == "stopped"]
    default = final_accuracy(default_dir)
    best_final = final_accuracy(sweep_dir / best["id"])
    return [
        row(f"sweep best trial ({best['id']}) final eval/accuracy", best_final, "accuracy", default),
        row(
            "sweep best config re-trained (best.yaml) final eval/accuracy",
            final_accuracy(sweep_dir / "best"),
            "accuracy",
            best_final,
        ),
        row("sweep trials stopped early by ASHA (of 6)", len(stopped), "trials"),
        row("sweep wall time (6 trials, 2 at a time)", sweep_s, "s"),
    ]
