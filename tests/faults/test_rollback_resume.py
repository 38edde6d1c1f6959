"""resume=PATH loads exactly that commit and continues the run from there (issue 16, finding 6): the
newer commits move to checkpoints/abandoned-<time>/ (kept, never resumed or deleted), metrics.jsonl
holds the new line (the old rows go to metrics.<old run id>.jsonl) under a new tracking run id, and
the same command again (a requeue, a re-run after exit 75) continues the rolled-back line instead of
rolling back again. And a fresh start over corrupt commits: a new line too."""

import json

import pytest

from pipeline import config, launch
from pipeline.checkpoint import commit
from pipeline.launch.plan import make_plan
from tests.helpers import LOCAL_SMALL_RUN, read_jsonl

pytestmark = pytest.mark.faults

BASE = [*LOCAL_SMALL_RUN, "checkpoint.every=4", "checkpoint.keep_last=10"]


def segment(digits_dir, run_dir, *extra):
    """One `pipeline train` on run_dir (BASE plus `extra`): its final metrics."""
    cfg = config.load("configs/smoke.yaml", [*BASE, f"data.train={digits_dir}", f"run_dir={run_dir}", *extra])
    return launch.train(make_plan(cfg))


def run_id_of(ckpt):
    return json.loads((ckpt / commit.STATE_FILE).read_text())["run_id"]


@pytest.mark.timeout(500)
def test_resume_path_rolls_back_and_a_rerun_continues_the_rolled_back_line(digits_dir, tmp_path, capfd):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"

    segment(digits_dir, run_dir, "train.max_steps=12")
    old_id = run_id_of(root / "step_00000012")
    back = f"resume={root / 'step_00000004'}"
    capfd.readouterr()
    final = segment(digits_dir, run_dir, back, "train.max_steps=12")
    told = capfd.readouterr().err  # the user is told what moved where, and about W&B
    assert "rolled back to step 4; the newer checkpoints step_00000008, step_00000012 were moved to" in told
    assert "W&B cannot rewrite steps" in told
    events = read_jsonl(run_dir / "events.jsonl")
    assert [e["from_step"] for e in events if e["event"] == "resume"] == [4]  # before: 12, the newest
    (rollback,) = [e for e in events if e["event"] == "rollback"]
    assert rollback["abandoned_run_id"] == old_id and rollback["run_id"] != old_id
    (abandoned,) = root.glob("abandoned-*")
    assert sorted(p.name for p in abandoned.iterdir()) == ["step_00000008", "step_00000012"]
    assert [c.name for c in commit.committed(root)] == ["step_00000004", "step_00000008", "step_00000012"]
    assert run_id_of(root / "step_00000012") == rollback["run_id"] == final["run_id"]
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 13))  # the new line's steps 5-12 logged, none muted, none twice
    old_steps = [r["step"] for r in read_jsonl(run_dir / f"metrics.{old_id}.jsonl") if "train/loss" in r]
    assert old_steps == list(range(1, 13))

    # the same command again, training longer: continues the rolled-back line from its step 12
    final = segment(digits_dir, run_dir, back, "train.max_steps=16")
    resumes = [e["from_step"] for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert resumes == [4, 12] and final["step"] == 16 and final["run_id"] == rollback["run_id"]
    assert len(list(root.glob("abandoned-*"))) == 1
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 17))


@pytest.mark.timeout(300)
def test_a_fresh_start_over_corrupt_commits_keeps_its_own_commit_and_logs_every_step(digits_dir, tmp_path):
    """Every commit fails verification, so the run starts fresh: the corrupt ones are set aside, never
    counted as newest (before: keep_last=1 kept the corrupt step 8 and deleted the fresh run's only
    valid commit, step 4), and the old run's metrics no longer mute the new steps 1-4."""
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"

    segment(digits_dir, run_dir, "train.max_steps=8")
    old_id = run_id_of(root / "step_00000008")
    for ckpt in commit.committed(root):
        (ckpt / commit.STATE_FILE).write_text("{}")
    final = segment(digits_dir, run_dir, "train.max_steps=4", "checkpoint.keep_last=1")
    assert final["run_id"] != old_id and not [
        e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "resume"
    ]
    assert [c.name for c in commit.committed(root)] == ["step_00000004"]
    commit.verify(root / "step_00000004")
    assert sorted(p.name[:21] for p in root.glob("corrupt-*")) == [
        "corrupt-step_00000004",
        "corrupt-step_00000008",
    ]
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4]  # before: muted, as replays of the old run's steps
    assert len([r for r in read_jsonl(run_dir / f"metrics.{old_id}.jsonl") if "train/loss" in r]) == 8
