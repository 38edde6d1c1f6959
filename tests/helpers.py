"""Helpers for tests: run the CLI as a user would, read jsonl files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from pipeline.data import shards, stream
from pipeline.data.transforms import normalize

REPO = Path(__file__).resolve().parents[1]

# A small, fast 2-process run without Ray (the local launcher, fp32): the overrides the fault tests
# of the local launcher start from, each adding its own intervals, retention and faults.
LOCAL_SMALL_RUN = [
    "cluster.launcher=local",
    "model.args.channels=[8,16]",
    "train.log_every=1",
    "optim.warmup_steps=2",
    "train.eval_every=0",
    "precision=fp32",
]


def few_local_steps(steps: int, collective_timeout_s: int = 120) -> list[str]:
    """Overrides of a short fp32 run on the local launcher that logs every step and neither evaluates
    nor checkpoints on the way (the dist matrices compare its per-step losses)."""
    return [
        "precision=fp32",
        "cluster.launcher=local",
        f"cluster.collective_timeout_s={collective_timeout_s}",
        "data.batch_size=16",
        f"train.max_steps={steps}",
        "optim.warmup_steps=1",
        "train.log_every=1",
        "train.eval_every=0",
        "checkpoint.every=0",
        "tracking.wandb.mode=disabled",
    ]


def run_cli(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None, timeout_s: float = 900):
    """Run `python -m pipeline ARGS` as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate_plain(model: torch.nn.Module, spec: shards.DataSpec, data_cfg, precision: str) -> float:
    """Accuracy of a plain module on all val shards, in the run's precision, no DeepSpeed."""
    model.eval()
    correct = total = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for batch in stream.eval_batches(spec, data_cfg, rank=0, world_size=1):
            x = normalize(batch.x, spec.mean, spec.std)
            correct += int((model(x).float().argmax(1) == batch.y).sum())
            total += len(batch.y)
    return correct / total


def rewrite_member(path, key, suffix, payload):
    """Replace (payload bytes) or drop (payload None) one member of a shard."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name == f"{key}.{suffix}":
                if payload is None:
                    continue
                data = payload
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def first_key(path, n=0):
    """The key of the n-th sample of a shard."""
    with tarfile.open(path) as tar:
        return [m.name.split(".")[0] for m in tar if m.name.endswith(".png")][n]


def read_wandb(path: Path) -> dict:
    """What an offline W&B run recorded, read from its `.wandb` file (pipeline.tracking.wandb_records):
    {"run_id", "group", "tags", "config" (top-level keys), "history": [{key: value, "_step": n}],
    "summary": {key: value}, "artifacts": [{"name", "type", "aliases", "refs"}], "exit_code": the run's
    exit code, None if it never finished}."""
    from pipeline.tracking import wandb_records

    found: dict = {
        "run_id": None,
        "group": None,
        "tags": [],
        "config": [],
        "history": [],
        "summary": {},
        "artifacts": [],
        "exit_code": None,
    }
    for record in wandb_records(path):
        which = record.WhichOneof("record_type")
        if which == "run":
            found["run_id"] = record.run.run_id
            found["group"], found["tags"] = record.run.run_group, list(record.run.tags)
            found["config"] = [u.key or "/".join(u.nested_key) for u in record.run.config.update]
        elif which == "history":
            found["history"].append(
                {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            )
        elif which == "summary":
            found["summary"] |= {
                (u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in record.summary.update
            }
        elif which == "exit":
            found["exit_code"] = record.exit.exit_code
        elif which == "artifact":
            art = record.artifact
            found["artifacts"].append(
                {
                    "name": art.name,
                    "type": art.type,
                    "aliases": list(art.aliases),
                    "refs": [c.ref for c in art.manifest.contents],
                }
            )
    return found


def wandb_segments(run_dir: Path) -> list[dict]:
    """Every offline W&B segment of a run dir (read_wandb of each), oldest first."""
    return [read_wandb(p) for p in sorted((Path(run_dir) / "wandb").glob("offline-run-*/run-*.wandb"))]


def assert_one_wandb_run(run_dir: Path, segments: int, last_step: int) -> None:
    """The segments of a restarted run continue one W&B run: one id, steps strictly increasing."""
    found = wandb_segments(run_dir)
    assert len(found) == segments, [f["run_id"] for f in found]
    assert len({f["run_id"] for f in found}) == 1
    steps = [row["_step"] for f in found for row in f["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == last_step, steps


def run_local_pair(payloads: list[dict], nprocs: int = 2) -> None:
    """Several runs in turn in one pair of gloo processes (the local launcher's own worker, so a
    matrix costs one process start, not one per run); a failure fails the test with every rank's
    traceback. `nprocs`: the world size of every payload (its cluster.num_workers), 2 by default."""
    import pytest
    import torch.multiprocessing as mp

    from pipeline.launch import local
    from pipeline.net import free_port

    results = mp.get_context("spawn").SimpleQueue()
    try:
        mp.start_processes(
            local.worker, args=(nprocs, free_port(), payloads, results), nprocs=nprocs, start_method="spawn"
        )
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        errors = []  # "rank R, run ID:\n<traceback>", unless a rank died without a word
        while not results.empty():
            status, value = results.get()
            if status == "error":
                errors.append(value)
        pytest.fail("\n".join(errors) or str(e))
