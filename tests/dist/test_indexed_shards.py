"""Users' own shards train like prepared ones. The digits prepared by `pipeline data prepare`, rewritten
sample for sample (same keys, order, shard boundaries) by webdataset's ShardWriter in five layouts and
indexed by `pipeline data index`, train the CNN recipe with 2 gloo processes: the lossless layouts
(png, png+json, npy, input.npy+target.cls) give bitwise the losses and the val accuracy of the
prepared dataset, jpg the accuracy within 1 point. And exact resume holds on indexed shards: a run
stopped and resumed consumes the same samples (ledger) with the same losses as an unbroken one.

All runs share one pair of processes (`pipeline.launch.local.worker`, as tests/dist/test_recipes.py).
"""

from __future__ import annotations

import pytest

from pipeline import config
from pipeline.launch.plan import make_plan, worker_payload
from tests.helpers import read_jsonl, run_local_pair
from tests.unit.test_index import LAYOUTS, index_layout

pytestmark = pytest.mark.dist

STEPS = 60  # ~2.7 epochs of the 1,438 train digits at 64 samples a step: val accuracy ~0.9
COMMON = [
    "cluster.launcher=local",
    "precision=fp32",
    "model.args.channels=[8,16]",
    f"train.max_steps={STEPS}",
    "train.log_every=1",
    "train.eval_every=0",
    "optim.warmup_steps=5",
    "checkpoint.every=0",  # only at the end
    "tracking.wandb.mode=disabled",
    "cluster.collective_timeout_s=120",
]


def losses(run_dir):
    return [(m["step"], m["train/loss"]) for m in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in m]


def accuracy(run_dir):
    return [m["eval/accuracy"] for m in read_jsonl(run_dir / "metrics.jsonl") if "eval/accuracy" in m][-1]


def ledger(run_dir, rank):
    return {line["step"]: line["keys"] for line in read_jsonl(run_dir / "ledger" / f"rank{rank}.jsonl")}


def run_pair(plans: dict) -> None:
    run_local_pair([worker_payload(plan, name) for name, plan in plans.items()])


@pytest.mark.timeout(400)
def test_indexed_layouts_train_like_the_prepared_digits_and_resume_exactly(digits_dir, tmp_path):
    data = {"prepared": digits_dir}
    data |= {layout: index_layout(digits_dir, tmp_path / "data", layout) for layout in LAYOUTS}

    def plan(name, *extra):
        return make_plan(config.load("configs/smoke.yaml", [*COMMON, f"run_dir={tmp_path / name}", *extra]))

    plans = {name: plan(name, f"data.train={d}") for name, d in data.items()}
    # Exact resume on indexed shards (png + json labels): an unbroken run of 16 steps, and one of 8 steps
    # resumed from its final commit to 16, in the same pair of processes (payloads run in turn). A
    # constant LR makes the 8-step segment's schedule the unbroken run's. Only the stopped run evaluates
    # at step 8 (its end): evaluating must leave the global RNG as it found it (the val DataLoader draws
    # its seed from it, and the step-8 commit saves the RNG state).
    resume = [
        f"data.train={data['json']}",
        "data.ledger=true",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "train.eval_every=0",
    ]
    plans["unbroken"] = plan("unbroken", *resume, "train.max_steps=16")
    plans["stopped"] = plan("stopped", *resume, "train.max_steps=8")
    plans["resumed"] = plan("stopped", *resume, "train.max_steps=16")
    plans["resumed"].resume_from = tmp_path / "stopped" / "checkpoints" / "step_00000008"  # written first
    run_pair(plans)

    reference = losses(tmp_path / "prepared")
    assert len(reference) == STEPS
    for layout in LAYOUTS:
        if layout == "jpg":  # lossy: other pixels, so other losses; the same accuracy within 1 point
            assert abs(accuracy(tmp_path / layout) - accuracy(tmp_path / "prepared")) <= 0.01
        else:
            assert losses(tmp_path / layout) == reference, layout  # bitwise, every step
            assert accuracy(tmp_path / layout) == accuracy(tmp_path / "prepared"), layout
    assert accuracy(tmp_path / "prepared") > 0.8  # a meaningful accuracy to compare

    (resumed,) = [e for e in read_jsonl(tmp_path / "stopped" / "events.jsonl") if e["event"] == "resume"]
    assert resumed["from_step"] == 8
    assert (
        losses(tmp_path / "stopped") == losses(tmp_path / "unbroken")
        and len(losses(tmp_path / "unbroken")) == 16
    )
    for rank in (0, 1):
        keys = ledger(tmp_path / "stopped", rank)
        assert keys == ledger(tmp_path / "unbroken", rank) and sorted(keys) == list(range(1, 17))
