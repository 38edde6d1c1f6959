"""`pipeline bench startup`: seconds from `pipeline train` (a new process) to the first step done, and
how they split, read from the run's `startup` event (the loop records it at the first step). DeepSpeed's
op cache is warmed by a first run that is not counted."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.bench import find_config, median, row

PHASES = [
    ("cli_and_plan_s", "python, imports, config + data validation"),
    ("ray_start_s", "Ray start (in-process cluster)"),
    ("worker_group_s", "Ray worker group + torch.distributed"),
    ("deepspeed_init_s", "model + DeepSpeed engine init"),
    ("data_and_tracking_s", "data loader, tracking, start summary"),
    ("first_batch_s", "waiting for the first batch"),
    ("first_step_s", "first step (forward, backward, update)"),
]


def one_run(data: Path, run_dir: Path, *overrides: str) -> dict[str, Any]:
    args = [f"data.train={data}", f"run_dir={run_dir}", "train.max_steps=3", "train.eval_every=0"]
    args += ["tracking.wandb.mode=disabled", "resume=never", "optim.warmup_steps=1", *overrides]
    config = find_config("smoke")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", str(config), *args],
        cwd=config.parents[1],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pipeline train failed:\n{result.stderr[-3000:]}")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return next(e for e in events if e["event"] == "startup")


def run(data: Path, repeats: int = 3) -> list[dict[str, Any]]:
    data = data.resolve()  # `pipeline train` runs in the checkout
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        one_run(data, Path(tmp) / "warm")  # DeepSpeed's JIT op cache, page cache: not counted
        runs = [one_run(data, Path(tmp) / f"run{i}") for i in range(repeats)]
    total = median([r["startup_s"] for r in runs])
    rows = [row("pipeline train -> first step done (smoke, 2 Ray workers)", total, "s", 20.0)]
    for key, what in PHASES:
        rows.append(row(f"  {what}", median([r[key] for r in runs]), "s", total))
    return rows
