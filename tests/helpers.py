"""Helpers for tests: run the CLI as a user would, read jsonl files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.data import shards, stream

REPO = Path(__file__).resolve().parents[1]


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
            correct += int((model(batch.x).float().argmax(1) == batch.y).sum())
            total += len(batch.y)
    return correct / total
