"""`train.compile` through DeepSpeed (issue 19): with 2 gloo workers a CNN compiled by inductor under ZeRO-0
and ZeRO-3 (whose parameter-gathering hooks run around every module) trains to the per-step losses of the
eager run (fp32; kernels fused differently round differently, so close, not bitwise; no dropout, whose
masks inductor draws from an RNG of its own: seeded from torch's, so compiled runs resume exactly, but
not eager's masks), its checkpoint
holds the eager model's names (`pipeline export` of either loads into a plain nn.Module), and the startup
event reports the seconds the first step spent compiling. ZeRO-1/2 shard only optimizer state and
gradients, outside the compiled module: tests/faults/test_compile_resume.py trains under ZeRO-2. The
three runs share one start of the local launcher's pair of processes."""

from __future__ import annotations

import pytest
import torch

from pipeline import config
from pipeline.checkpoint import export
from pipeline.launch.plan import make_plan, worker_payload
from tests.helpers import few_local_steps, read_jsonl, run_local_pair

pytestmark = pytest.mark.dist

STEPS = 5
RUNS = {"eager": (False, 0), "compiled-zero0": (True, 0), "compiled-zero3": (True, 3)}


@pytest.mark.timeout(600)
def test_compiled_runs_train_like_eager_ones_under_zero_0_and_3(digits_dir, tmp_path):
    plans = {}
    for name, (compiled, stage) in RUNS.items():
        cfg = config.load(
            "configs/smoke.yaml",
            [
                f"data.train={digits_dir}",
                f"run_dir={tmp_path / name}",
                f"train.compile={str(compiled).lower()}",
                "model.args.dropout=0.0",  # inductor draws dropout masks from its own RNG, not eager's
                f"zero.stage={stage}",
                *few_local_steps(STEPS, collective_timeout_s=300),  # the first step compiles on both ranks
            ],
        )
        plans[name] = make_plan(cfg)
    run_local_pair([worker_payload(plan, name) for name, plan in plans.items()])

    def losses(name):
        return [r["train/loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "train/loss" in r]

    def startup(name, kind="startup"):
        (event,) = [e for e in read_jsonl(tmp_path / name / "events.jsonl") if e["event"] == kind]
        return event

    eager = losses("eager")
    assert len(eager) == STEPS and "compile_s" not in startup("eager")
    weights = export.consolidated_state_dict(tmp_path / "eager" / "checkpoints" / f"step_{STEPS:08d}")
    for name in ("compiled-zero0", "compiled-zero3"):
        assert startup(name, "start")["compile"] == {"mode": "default", "dynamic": None}  # the summary's
        assert losses(name) == pytest.approx(eager, rel=1e-4, abs=1e-5), name
        # compiled in this run, inside its first step (the timers count per run, not per process)
        assert 0 < startup(name)["compile_s"] <= startup(name)["first_step_s"], name
        compiled = export.consolidated_state_dict(tmp_path / name / "checkpoints" / f"step_{STEPS:08d}")
        assert compiled.keys() == weights.keys(), name  # no `_orig_mod.` prefixes
        for key, tensor in weights.items():
            # Adam's update is about lr (3e-3) wherever a gradient is not ~0, whatever its rounding:
            # weights agree to well under one step's update
            assert torch.allclose(compiled[key].float(), tensor.float(), atol=1e-3), (name, key)
