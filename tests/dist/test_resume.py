"""Re-running a run continues from its newest verified checkpoint (resume=auto), with the same run id."""

import pytest

from pipeline import config, launch
from pipeline.checkpoint import commit
from pipeline.config import ConfigError
from pipeline.launch.plan import make_plan, resume_point
from tests.helpers import read_jsonl

pytestmark = pytest.mark.dist


def _cfg(digits_dir, run_dir, *extra):
    base = [
        f"data.train={digits_dir}",
        f"run_dir={run_dir}",
        "cluster.launcher=local",
        "model.args.channels=[8,16]",
        "train.log_every=5",
        "optim.warmup_steps=5",
        "checkpoint.every=10",
        "checkpoint.keep_last=3",
    ]
    return config.load("configs/smoke.yaml", [*base, *extra])


@pytest.mark.timeout(300)
def test_rerun_resumes_and_falls_back_past_a_corrupt_commit(digits_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    first = launch.train(make_plan(_cfg(digits_dir, run_dir, "train.max_steps=20")))
    second = launch.train(make_plan(_cfg(digits_dir, run_dir, "train.max_steps=40")))

    events = read_jsonl(run_dir / "events.jsonl")
    assert [e["event"] for e in events] == [
        "start",
        "startup",
        "checkpoint_commit",
        "checkpoint_commit",
        "finish",
        "start",
        "resume",
        "startup",
        "first_step_after_resume",
        "checkpoint_commit",
        "checkpoint_commit",
        "finish",
    ]
    resume = events[6]
    assert resume["from_step"] == 20 and resume["checkpoint"].endswith("step_00000020")
    assert first["run_id"] == second["run_id"] == events[0]["run_id"] == events[5]["run_id"]
    steps = [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in m]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]  # never backwards, nothing repeated
    losses = [m["train/loss"] for m in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in m]
    assert losses[4] < losses[0] * 0.8  # the second segment starts from trained weights, not from scratch
    assert second["train/samples_seen"] == 40 * 64

    # keep_last=3 of 10, 20, 30, 40. Corrupt the newest: auto-resume falls back to 30, naming the file.
    ckpts = commit.committed(run_dir / "checkpoints")
    assert [c.name for c in ckpts] == ["step_00000020", "step_00000030", "step_00000040"]
    (ckpts[-1] / "trainer_state.json").write_text("{}")
    capsys.readouterr()
    assert resume_point(_cfg(digits_dir, run_dir)) == ckpts[1]
    warning = capsys.readouterr().err
    assert "skipping checkpoint step_00000040" in warning and "trainer_state.json" in warning

    # An explicit resume=PATH to a corrupt checkpoint is a usage error, never a silent fresh start.
    with pytest.raises(ConfigError, match=r"'resume'.*trainer_state.json"):
        resume_point(_cfg(digits_dir, run_dir, f"resume={ckpts[-1]}"))
    with pytest.raises(ConfigError, match=r"'resume': no committed checkpoint"):
        resume_point(_cfg(digits_dir, run_dir, f"resume={tmp_path / 'nothing'}"))
    with pytest.raises(ConfigError, match="resume=never but"):
        resume_point(_cfg(digits_dir, run_dir, "resume=never"))
