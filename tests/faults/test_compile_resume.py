"""Exact resume with `train.compile` on (issue 19): a compiled 2-worker run (ZeRO-2, fp32, local launcher)
whose rank 1 is SIGKILLed mid-epoch, re-run, logs bitwise the per-step losses of the compiled run that
was never interrupted and ends on the same weights: the resumed processes compile again, to the same
kernels. A compiled run's checkpoint also resumes without compiling (the names are the eager model's)."""

import pytest
import torch

from pipeline import config, launch
from pipeline.checkpoint import commit, export
from pipeline.launch.plan import make_plan
from tests.helpers import LOCAL_SMALL_RUN, read_jsonl, run_cli

pytestmark = pytest.mark.faults

MAX_STEPS = 14  # 2 x 32 samples a step: an epoch of the 1,438 digits is 22 steps


def args(digits_dir, run_dir, *extra):
    return [
        *LOCAL_SMALL_RUN,
        f"data.train={digits_dir}",
        f"run_dir={run_dir}",
        "train.compile=true",
        "cluster.collective_timeout_s=300",  # the first step compiles on both ranks
        f"train.max_steps={MAX_STEPS}",
        "checkpoint.every=4",
        "checkpoint.keep_last=10",
        "tracking.wandb.mode=disabled",
        *extra,
    ]


def losses(run_dir):
    """{step: train/loss}, each step once (a redone step's second log replaces its first)."""
    return {r["step"]: r["train/loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r}


def final_weights(run_dir):
    return export.consolidated_state_dict(commit.committed(run_dir / "checkpoints")[-1])


@pytest.mark.timeout(900)
def test_a_compiled_run_killed_mid_epoch_resumes_to_the_same_losses_and_weights(digits_dir, tmp_path):
    unbroken = tmp_path / "unbroken"
    assert (
        launch.train(make_plan(config.load("configs/smoke.yaml", args(digits_dir, unbroken))))["step"] == 14
    )

    killed = tmp_path / "killed"
    cli = ["train", "configs/smoke.yaml", *args(digits_dir, killed)]
    proc = run_cli(*cli, env={"PIPELINE_FAULTS": "kill@11:1"})  # SIGKILL of rank 1 at step 11
    assert proc.returncode == 1, proc.stderr[-3000:]
    proc = run_cli(*cli)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = read_jsonl(killed / "events.jsonl")
    (resume,) = [e for e in events if e["event"] == "resume"]
    assert resume["from_step"] == 8  # steps 9 and 10 are redone
    assert [e["compile_s"] > 0 for e in events if e["event"] == "startup"] == [True, True]  # both compiled

    want, got = losses(unbroken), losses(killed)
    assert sorted(got) == list(range(1, MAX_STEPS + 1)) and got == want  # == on floats: bitwise
    want_weights, got_weights = final_weights(unbroken), final_weights(killed)
    assert got_weights.keys() == want_weights.keys()
    assert all(torch.equal(got_weights[k], want_weights[k]) for k in want_weights)

    # the same checkpoint, resumed eagerly: it loads (no `_orig_mod.` names) and trains on
    eager = run_cli(*cli, "train.compile=false", f"train.max_steps={MAX_STEPS + 2}")
    assert eager.returncode == 0, eager.stderr[-3000:]
    assert max(losses(killed)) == MAX_STEPS + 2
