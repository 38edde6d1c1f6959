"""`pipeline bench compile`: what `train.compile` buys. Steady-state seconds per step of `pipeline train`
(2 Ray workers, ZeRO-2, the recipe's precision, data streamed from shards) with and without torch.compile
for the CNN, ResNet-18 and LSTM recipes, measured as `pipeline bench overhead` measures (its warm-up
windows hold the first step, which compiles), and the compile time apart: the startup event's compile_s,
the seconds the first step spent in dynamo and inductor on one worker. Eager and compiled runs of a
recipe alternate when repeated, so drift on a shared machine hits both alike."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.bench import median, row
from pipeline.bench.overhead import bench_config, pipeline_seconds_per_step

RECIPES = ("cnn", "resnet18", "lstm")  # of bench overhead's recipes (their configs, windows, warm-up)
STAGE = 2  # the recipes' own ZeRO stage

# What a reader of the table needs to know when compiled is not faster (checked against the ratio).
WHY_SLOWER = {
    "lstm": "nn.LSTM is one opaque kernel (oneDNN on CPU, cuDNN on GPU): dynamo runs it eagerly, so "
    "only the small head around it compiles",
}


def compile_time(run_dir: Path) -> float:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return next(e for e in events if e["event"] == "startup").get("compile_s", 0.0)


def run(
    recipes: list[str], data: Path, repeats: int = 1, echo: Callable[[str], Any] = print
) -> list[dict[str, Any]]:
    """The compile table: per recipe, compiled s/step against eager, then the compile time."""
    rows: list[dict[str, Any]] = []
    for recipe in recipes:
        eager: list[float] = []
        compiled: list[float] = []
        compile_s: list[float] = []
        with tempfile.TemporaryDirectory(prefix=f"bench-compile-{recipe}-") as tmp:
            for repeat in range(repeats):
                cfg = bench_config(recipe, data, Path(tmp) / f"eager{repeat}", STAGE)
                eager += pipeline_seconds_per_step(recipe, cfg)[0]
                cfg = bench_config(recipe, data, Path(tmp) / f"compiled{repeat}", STAGE, "train.compile=true")
                compiled += pipeline_seconds_per_step(recipe, cfg)[0]
                compile_s.append(compile_time(cfg.resolved_run_dir))
        eager_s, compiled_s = median(eager), median(compiled)
        rows.append(row(f"compile {recipe}", compiled_s, "s/step", eager_s))
        rows.append(row(f"compile {recipe}: compile time (first step)", median(compile_s), "s"))
        if compiled_s > eager_s and recipe in WHY_SLOWER:
            echo(f"{recipe}: compiled is {compiled_s / eager_s:.2f}x eager: {WHY_SLOWER[recipe]}")
    return rows
