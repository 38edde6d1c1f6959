"""Rank 0 killed at each point of the commit protocol (checkpoint/commit.py: MANIFEST written, renamed,
retention deleting an old commit) in a real 2-process run (local launcher): the next start resumes from
the last good commit and finishes. The point between moving a re-saved step's old commit aside and the
rename is unreachable in a run (a re-save needs a newer commit that resume sets aside first); the unit
tier kills a process there (tests/unit/test_trust_data_loss.py)."""

import pytest

from pipeline import config, launch
from pipeline.checkpoint import commit
from pipeline.launch.plan import TrainingFailed, make_plan
from tests.helpers import LOCAL_SMALL_RUN, read_jsonl

pytestmark = pytest.mark.faults

BASE = [*LOCAL_SMALL_RUN, "checkpoint.every=4", "checkpoint.keep_last=1", "train.max_steps=8"]


@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    ("point", "after_crash", "resumed_from"),
    [
        ("after_manifest", ["step_00000004"], 4),  # the MANIFEST of step 8 is written, not renamed
        # retention had no time to run; the resumed finished run commits nothing, so step 4 stays
        ("after_rename", ["step_00000004", "step_00000008"], 8),
        ("in_retention", ["step_00000008"], 8),  # step 4 half deleted: debris, never a commit
    ],
)
def test_a_crash_in_the_commit_resumes_from_the_last_good_commit(
    digits_dir, tmp_path, monkeypatch, point, after_crash, resumed_from
):
    run_dir = tmp_path / "run"
    cfg = config.load("configs/smoke.yaml", [*BASE, f"data.train={digits_dir}", f"run_dir={run_dir}"])
    monkeypatch.setenv("PIPELINE_FAULTS", f"crash_{point}@8")
    with pytest.raises(TrainingFailed):
        launch.train(make_plan(cfg))
    root = run_dir / "checkpoints"
    assert [c.name for c in commit.committed(root)] == after_crash
    for ckpt in commit.committed(root):
        commit.verify(ckpt)

    monkeypatch.delenv("PIPELINE_FAULTS")
    final = launch.train(make_plan(cfg))
    (resume,) = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert resume["from_step"] == resumed_from and final["step"] == 8
    assert [c.name for c in commit.committed(root)] == (
        after_crash if resumed_from == 8 else ["step_00000008"]
    )
    assert [p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".lock"] == []
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 9))  # every step logged once, none lost to the crash
