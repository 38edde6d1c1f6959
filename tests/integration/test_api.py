"""The Python API from outside the package, as a user's script calls it: `pipeline.train` on the
local Ray cluster (loopback 127.0.0.1, 2 workers) returns a Result that is what the run dir's
files say, and `Result.from_path` reads the same Result back."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from pipeline.checkpoint import commit
from tests.helpers import REPO, read_jsonl

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
def test_train_from_a_script_returns_the_runs_result(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import json
        import pipeline

        result = pipeline.train(
            "configs/smoke.yaml",
            data={{"train": {str(digits_dir)!r}}},
            train={{"max_steps": 50}},
            run_dir={str(run_dir)!r},
        )
        assert isinstance(result, pipeline.Result)
        assert pipeline.Result.from_path({str(run_dir)!r}) == result
        fields = ("metrics", "metrics_history", "best", "checkpoint", "run_id", "step", "preempted")
        print("RESULT " + json.dumps({{name: getattr(result, name) for name in fields}}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=540
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])

    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert result["metrics_history"] == rows
    last: dict = {}
    for row in rows:
        last |= row
    assert result["metrics"] == last and result["metrics"]["step"] == 50
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [50]  # eval_every=100: only at the end
    assert result["best"] == ["eval/accuracy", evals[0]["eval/accuracy"], 50]
    (ckpt,) = commit.committed(run_dir / "checkpoints")
    assert result["checkpoint"] == str(ckpt) and ckpt.name == "step_00000050"
    (start,) = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "start"]
    assert result["run_id"] == start["run_id"] and start["world_size"] == 2
    assert result["step"] == 50 and result["preempted"] is False
