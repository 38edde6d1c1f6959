"""A resumed segment logs to W&B every step W&B does not hold yet, which may be more than
metrics.jsonl lacks: W&B writes in the background, so a killed process loses W&B records that
metrics.jsonl (flushed per line) kept. Seen as a flaky killed-driver test: W&B ended at step 23."""

import json

import pytest

from pipeline import tracking
from pipeline.config import WandbConfig
from tests.helpers import read_jsonl, wandb_segments


@pytest.mark.timeout(120)
def test_a_resumed_segment_fills_the_steps_wandb_lost(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the suite disables W&B; this test is about it

    def segment():
        return tracking.make_tracker(
            is_rank0=True,
            run_dir=tmp_path,
            total_steps=10,
            wandb_cfg=WandbConfig(mode="offline"),
            config={},
            run_id="lost0001",
            name="lost",
        )

    first = segment()
    for step in range(1, 6):
        first.log(step, {"train/loss": 1.0 / step}, show=False)
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:  # steps 6-8 reached metrics.jsonl, not W&B
        for step in range(6, 9):
            f.write(json.dumps({"step": step, "train/loss": 1.0 / step}) + "\n")

    second = segment()  # resumed from a checkpoint at step 2: re-does steps 3-10
    for step in range(3, 11):
        second.log(step, {"train/loss": 1.0 / step}, show=False)
    second.close()

    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(1, 11))
    steps = [row["_step"] for seg in wandb_segments(tmp_path) for row in seg["history"]]
    assert steps == list(range(1, 11))  # once each, in order, none lost
    assert [seg["exit_code"] for seg in wandb_segments(tmp_path)] == [0, 0]
