"""`pipeline bench recipes`: does each recipe learn on real data? Runs `pipeline train configs/<recipe>.yaml`
on MNIST-5k (the language models: on the stdlib's English text, `text-stdlib`, prepared beside it) and
checks the figure the recipe promises, with the wall time.

RECIPE: cnn resnet18 lstm-rows gru-rows lstm-next-row autoencoder vae dcgan lstm-lm-text gru-lm-text
(default: all, in that order; dcgan scores its samples with the cnn run's classifier, so cnn runs
first when dcgan is asked).
Per recipe the table has its first eval, its last eval against the goal (`ratio` = last / baseline:
the goal itself for accuracies and scores, >= 1 meets it; the first eval or the copy-the-last-row error
for the errors, <= the goal's factor meets it; the row's name says which and whether it was met) and
its wall time.
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

from pipeline.bench import find_config, row

# recipe: (config, metric, goal, kind) with kind "min" (metric >= goal), "max" (metric <= goal),
# "drop" (last eval <= goal x first),
# "persistence" (last eval <= goal x the error of predicting each row as a copy of the previous one)
GOALS = {
    "cnn": ("cnn-mnist5k", "eval/accuracy", 0.95, "min"),
    "resnet18": ("resnet18-mnist5k", "eval/accuracy", 0.97, "min"),
    "lstm-rows": ("lstm-rows-mnist5k", "eval/accuracy", 0.95, "min"),
    "gru-rows": ("gru-rows-mnist5k", "eval/accuracy", 0.95, "min"),
    "lstm-next-row": ("lstm-next-row-mnist5k", "eval/next_step_mse", 0.5, "persistence"),
    "autoencoder": ("autoencoder-mnist5k", "eval/recon_mse", 0.5, "drop"),
    "vae": ("vae-mnist5k", "eval/recon_mse", 0.5, "drop"),
    "dcgan": ("dcgan-mnist5k", "eval/digit_score", 5.0, "min"),
    "lstm-lm-text": ("lstm-lm-text", "eval/bpc", 2.2, "max"),
    "gru-lm-text": ("gru-lm-text", "eval/bpc", 2.2, "max"),
}
UNITS = {"eval/accuracy": "fraction", "eval/digit_score": "score", "eval/bpc": "bits/char"}  # else MSEs
TEXT_SEQ_LEN = 128  # the windows configs/*-lm-text.yaml are written for


def text_data(data: Path) -> Path:
    """The stdlib text's token shards beside the MNIST-5k ones (prepared once, as the configs say)."""
    from pipeline.data import text

    out = data.parent / "text-stdlib"
    if not (out / "MANIFEST.json").is_file():
        source = text.load_text_source(text.TEXT_STDLIB)
        text.write_text_prepared(source, out, seq_len=TEXT_SEQ_LEN, overwrite=True)
    return out


def evals(run_dir: Path, metric: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r[metric] for r in rows if metric in r]


def persistence_mse(data: Path) -> float:
    """Val MSE of the naive forecast "the next row equals this one", in the normalised space."""
    from pipeline import config
    from pipeline.data.stream import eval_batches
    from pipeline.data.transforms import normalize
    from pipeline.launch.plan import make_plan
    from pipeline.tensors import as_sequence

    cfg = config.load(find_config("lstm-next-row-mnist5k"), [f"data.train={data}"])
    spec = make_plan(cfg).spec
    total = count = 0.0
    for batch in eval_batches(spec, cfg.data, rank=0, world_size=1):
        rows = as_sequence(normalize(batch.x, spec.mean, spec.std)).float()
        total += float(((rows[:, 1:] - rows[:, :-1]) ** 2).sum())
        count += rows[:, 1:].numel()
    return total / count


def run(
    recipes: list[str], data: Path, runs: Path, launcher: str = "ray", echo: Callable[[str], Any] = print
) -> list[dict[str, Any]]:
    """Train each recipe on the MNIST-5k shards in `data`, its run dir under `runs` (replaced), with
    `cluster.launcher=launcher`; the table of their evals against their goals and wall times."""
    unknown = [r for r in recipes if r not in GOALS]
    assert not unknown, f"unknown recipes {unknown}"  # the CLI checks names before anything starts
    recipes = (["cnn"] if "dcgan" in recipes and "cnn" not in recipes else []) + recipes
    data, runs = data.resolve(), runs.resolve()  # `pipeline train` runs in the checkout
    configs = {recipe: find_config(GOALS[recipe][0]) for recipe in recipes}  # all found before any run
    rows = []
    for recipe in recipes:
        name, metric, goal, kind = GOALS[recipe]
        run_dir = runs / name
        is_text = metric == "eval/bpc"
        overrides = [
            f"run_dir={run_dir}",
            "resume=never",
            f"data.train={text_data(data) if is_text else data}",
            f"cluster.launcher={launcher}",
        ]
        if recipe == "dcgan":
            overrides.append(f"task.score_classifier={runs / 'cnn-mnist5k'}")
        shutil.rmtree(run_dir, ignore_errors=True)
        echo(f"{recipe}: pipeline train {configs[recipe]} ...")
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "train", str(configs[recipe]), *overrides],
            cwd=configs[recipe].parents[1],
            capture_output=True,
            text=True,
        )
        wall_s = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            rows.append(row(f"{recipe}: FAILED (exit {proc.returncode}), wall time", wall_s, "s"))
            continue
        values = evals(run_dir, metric)
        last, first = values[-1], values[0]
        unit = UNITS.get(metric, "MSE")
        if kind == "persistence":
            baseline = persistence_mse(data)
            ok, target = last <= goal * baseline, f"vs copy-last-row, goal <= {goal:g}x"
        elif kind == "drop":
            baseline = first
            ok, target = last <= goal * first, f"vs first eval, goal <= {goal:g}x"
        elif kind == "max":
            baseline = goal
            ok, target = last <= goal, f"vs goal {goal:g}, <= 1"
        else:
            baseline = goal
            ok, target = last >= goal, f"vs goal {goal:g}, >= 1"
        rows.append(row(f"{recipe}: {metric} first eval", first, unit))
        rows.append(
            row(f"{recipe}: {metric} last eval ({target}: {'met' if ok else 'MISSED'})", last, unit, baseline)
        )
        if is_text:  # the same loss as perplexity, and the text the last eval generated
            rows.append(
                row(f"{recipe}: eval/perplexity last eval", evals(run_dir, "eval/perplexity")[-1], "ppl")
            )
            last_text = sorted((run_dir / "samples").glob("*.txt"))[-1]
            echo(f"{recipe}: generated at the last eval ({last_text}):")
            echo(last_text.read_text())
        rows.append(row(f"{recipe}: wall time", wall_s, "s"))
    return rows
