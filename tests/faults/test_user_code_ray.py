"""A user's package on the run's own local Ray cluster (127.0.0.1), 2 workers: named by file path from the
CLI, and by module path from a Python script that only put it on sys.path (as a notebook would), the
Ray workers import it as the driver did. SIGKILL of a worker: Ray restarts it and the per-step losses
equal the unbroken run's (fp32, bitwise); `pipeline eval` and `pipeline export` work on its checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers import REPO, read_jsonl, run_cli

pytestmark = pytest.mark.faults

USERPKG = REPO / "tests" / "userpkg"
COMMON = {
    "model": {"args": {"hidden": 32}},
    "task": {"args": {"label_smoothing": 0.05, "mixup_alpha": 0.2}},
    "precision": "fp32",
    "train": {"max_steps": 16, "log_every": 1, "eval_every": 8},
    "optim": {"warmup_steps": 2},
    "checkpoint": {"every": 4, "keep_last": 10},
    "cluster": {"max_failures": 1},
}


def flat(tree, prefix=""):
    """{'a': {'b': 1}} -> ['a.b=1'] (JSON values are YAML)."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("args",):
            out += flat(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


@pytest.mark.timeout(900)
def test_user_package_on_ray_restarts_after_a_kill_exactly(digits_dir, tmp_path):
    unbroken = run_cli(
        "train",
        "configs/smoke.yaml",
        *flat(COMMON),
        f"data.train={digits_dir}",
        f"run_dir={tmp_path / 'unbroken'}",
        "model.name=tests/userpkg/userpkg/models.py:TinyNet",
        "task.name=tests/userpkg/userpkg/tasks.py:SmoothClassify",
    )
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]

    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(USERPKG)!r})  # not in PYTHONPATH: the workers get it from the driver
        import pipeline

        common = json.loads({json.dumps(json.dumps(COMMON))})
        common["model"]["name"] = "userpkg.models:TinyNet"
        common["task"]["name"] = "userpkg.tasks:SmoothClassify"
        data, run_dir = {{"train": {str(digits_dir)!r}}}, {str(tmp_path / "killed")!r}
        result = pipeline.train("configs/smoke.yaml", data=data, run_dir=run_dir, **common)
        print("RESULT", json.dumps({{"checkpoint": str(result.checkpoint), "best": result.best}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    killed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**env, "PIPELINE_FAULTS": "kill@11:1"},  # SIGKILL of rank 1's process at step 11
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == 0, killed.stderr[-3000:]
    events = read_jsonl(tmp_path / "killed" / "events.jsonl")
    assert [e["attempt"] for e in events if e["event"] == "restart"] == [1]
    assert [e["from_step"] for e in events if e["event"] == "resume"] == [8]
    rows = {n: read_jsonl(tmp_path / n / "metrics.jsonl") for n in ("unbroken", "killed")}
    for name in ("train/loss", "train/accuracy", "eval/confidence"):
        series = {n: {r["step"]: r[name] for r in rows[n] if name in r} for n in rows}
        assert series["killed"] == series["unbroken"] and len(series["killed"]) >= 2, name  # bitwise
    assert "step_00000016" in killed.stdout.split("RESULT", 1)[1]

    # eval and export from the CLI: the run's config names the user's classes; PYTHONPATH finds them
    user_env = {"PYTHONPATH": str(USERPKG)}
    scored = run_cli("eval", str(tmp_path / "killed"), env=user_env)
    assert scored.returncode == 0, scored.stderr[-3000:]
    metrics = json.loads(scored.stdout.strip().splitlines()[-1])
    assert metrics["eval/accuracy"] == pytest.approx(rows["killed"][-1]["eval/accuracy"], abs=1e-6)
    out = tmp_path / "tiny.pt"
    exported = run_cli("export", str(tmp_path / "killed"), "--out", str(out), env=user_env)
    assert exported.returncode == 0, exported.stderr[-3000:]
    sys.path.insert(0, str(USERPKG))
    try:
        from userpkg.models import TinyNet

        model = TinyNet((1, 8, 8), 10, hidden=32)
        model.load_state_dict(torch.load(out, weights_only=True))  # plain torch, no pipeline
    finally:
        sys.path.remove(str(USERPKG))
