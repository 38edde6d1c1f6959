"""Does each recipe learn on real data? Runs `pipeline train configs/<recipe>.yaml` on MNIST-5k and
checks the figure the recipe promises, with the wall time.

    python benchmarks/recipes.py [RECIPE ...] [--json FILE] [--runs DIR]

RECIPE: cnn resnet18 lstm-rows gru-rows lstm-next-row autoencoder vae dcgan (default: all, in that
order; dcgan scores its samples with the cnn run's classifier, so cnn runs first when dcgan is asked).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# recipe: (config, metric, goal, kind) with kind "min" (metric >= goal), "drop" (last eval <= goal x first),
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
}


def evals(run_dir: Path, metric: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r[metric] for r in rows if metric in r]


def persistence_mse(data: Path) -> float:
    """Val MSE of the naive forecast "the next row equals this one", in the normalised space."""
    from pipeline import config
    from pipeline.data.stream import eval_batches
    from pipeline.data.transforms import normalize
    from pipeline.launch.plan import make_plan
    from pipeline.tasks.sequence import as_sequence

    cfg = config.load(REPO / "configs" / "lstm-next-row-mnist5k.yaml", [f"data.train={data}"])
    spec = make_plan(cfg).spec
    total = count = 0.0
    for batch in eval_batches(spec, cfg.data, rank=0, world_size=1):
        rows = as_sequence(normalize(batch.x, spec.mean, spec.std)).float()
        total += float(((rows[:, 1:] - rows[:, :-1]) ** 2).sum())
        count += rows[:, 1:].numel()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipes", nargs="*", default=list(GOALS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--runs", type=Path, default=REPO / "runs")
    parser.add_argument("--launcher", default="ray", help="cluster.launcher for every run (ray | local)")
    args = parser.parse_args()
    recipes = (["cnn"] if "dcgan" in args.recipes and "cnn" not in args.recipes else []) + args.recipes
    data = REPO / "data" / "mnist5k"
    if not (data / "MANIFEST.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline",
                "data",
                "prepare",
                "mnist5k",
                "--out",
                str(data),
                "--samples-per-shard",
                "250",
            ],
            check=True,
        )
    rows = []
    for recipe in recipes:
        name, metric, goal, kind = GOALS[recipe]
        run_dir = args.runs / name
        overrides = [
            f"run_dir={run_dir}",
            "resume=never",
            f"data.train={data}",
            f"cluster.launcher={args.launcher}",
        ]
        if recipe == "dcgan":
            overrides.append(f"task.score_classifier={args.runs / 'cnn-mnist5k'}")
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "train", f"configs/{name}.yaml", *overrides],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        wall_s = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            rows.append({"recipe": recipe, "ok": False, "error": f"exit {proc.returncode}", "wall_s": wall_s})
            continue
        values = evals(run_dir, metric)
        last, first = values[-1], values[0]
        if kind == "persistence":
            baseline = persistence_mse(data)
            ok, target = last <= goal * baseline, f"<= {goal:g} x copy-last-row ({goal * baseline:.4f})"
        else:
            ok = last >= goal if kind == "min" else last <= goal * first
            target = f">= {goal:g}" if kind == "min" else f"<= {goal:g} x first ({goal * first:.4f})"
        rows.append(
            {
                "recipe": recipe,
                "metric": metric,
                "first": first,
                "last": last,
                "best": max(values) if kind == "min" else min(values),
                "goal": target,
                "ok": ok,
                "wall_s": wall_s,
            }
        )
    print(
        f"{'recipe':15} {'metric':20} {'first eval':>10} {'last eval':>10}  {'goal':28} {'ok':4} {'time':>7}"
    )
    for r in rows:
        if "metric" not in r:
            print(f"{r['recipe']:15} failed: {r['error']}")
            continue
        print(
            f"{r['recipe']:15} {r['metric']:20} {r['first']:10.4f} {r['last']:10.4f}  {r['goal']:28} "
            f"{'yes' if r['ok'] else 'NO':4} {r['wall_s']:6.0f}s"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
