"""A user's own model and tasks (tests/userpkg, importable only through sys.path) train like the
built-in recipes: under ZeRO 0/2/3 in fp32 and bf16, two engines checkpointed and resumed exactly, and
a task that updates differently on different ranks stopped with a clear error instead of a hang."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline import config, launch
from pipeline.checkpoint import commit
from pipeline.launch.plan import make_plan, worker_payload
from tests.helpers import read_jsonl, run_local_pair

pytestmark = pytest.mark.dist

USERPKG = Path(__file__).resolve().parents[1] / "userpkg"


@pytest.fixture(autouse=True)
def userpkg_on_path(monkeypatch):
    """As a notebook or script would: on sys.path, not in the environment (workers get it from the
    payload; spawned processes also inherit sys.path)."""
    monkeypatch.syspath_prepend(str(USERPKG))
    yield
    for name in [m for m in sys.modules if m == "userpkg" or m.startswith("userpkg.")]:
        del sys.modules[name]


def user_cfg(digits_dir, run_dir, *extra):
    return config.load(
        "configs/smoke.yaml",
        [
            f"data.train={digits_dir}",
            f"run_dir={run_dir}",
            "model.name=userpkg.models:TinyNet",
            "model.args={hidden: 32}",
            "task.name=userpkg.tasks:SmoothClassify",
            "task.args={label_smoothing: 0.05, mixup_alpha: 0.2}",
            "cluster.launcher=local",
            "data.batch_size=32",
            "optim.warmup_steps=2",
            "tracking.wandb.mode=disabled",
            "cluster.collective_timeout_s=120",
            *extra,
        ],
    )


@pytest.mark.timeout(400)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_user_model_and_task_learn_under_zero_0_2_3(precision, digits_dir, tmp_path):
    plans = {
        stage: make_plan(
            user_cfg(
                digits_dir,
                tmp_path / f"zero{stage}",
                f"zero.stage={stage}",
                f"precision={precision}",
                "train.max_steps=40",
                "train.log_every=10",
                "train.eval_every=0",
                "optim.lr=0.01",
            )
        )
        for stage in (0, 2, 3)
    }
    run_local_pair([worker_payload(plan, f"user-{stage}-{precision}") for stage, plan in plans.items()])
    for stage in plans:
        rows = read_jsonl(tmp_path / f"zero{stage}" / "metrics.jsonl")
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        assert len(losses) == 4 and losses[-1] < 0.75 * losses[0], (stage, losses)
        assert "train/accuracy" in rows[-2] or any("train/accuracy" in r for r in rows)  # the task's own
        final = rows[-1]
        assert final["eval/accuracy"] > 0.6 and 0 < final["eval/confidence"] <= 1, (stage, final)
        (start,) = [
            e for e in read_jsonl(tmp_path / f"zero{stage}" / "events.jsonl") if e["event"] == "start"
        ]
        assert start["precision"] == precision
        assert commit.verify(tmp_path / f"zero{stage}" / "checkpoints" / "step_00000040")["engines"] == [
            "model"
        ]


@pytest.mark.timeout(400)
def test_two_engine_user_task_checkpoints_both_and_resumes_exactly(digits_dir, tmp_path):
    common = [
        "model.name=userpkg.models:TeacherStudent",
        "model.args={teacher_hidden: 32}",
        "task.name=userpkg.tasks:CoDistill",
        "task.args={alpha: 0.5}",
        "task.optim={student: {lr: 1.0e-2}}",
        "precision=fp32",
        "train.max_steps=16",
        "train.log_every=1",
        "train.eval_every=8",
        "checkpoint.every=4",
        "checkpoint.keep_last=10",
    ]
    unbroken = launch.train(make_plan(user_cfg(digits_dir, tmp_path / "unbroken", *common)))
    assert unbroken["eval/student_accuracy"] > 0.5
    killed_dir = tmp_path / "killed"
    faults = "kill@11:1"  # SIGKILL of rank 1 at step 11: the local launcher fails, a re-run resumes
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PIPELINE_FAULTS", faults)
        with pytest.raises(launch.TrainingFailed):
            launch.train(make_plan(user_cfg(digits_dir, killed_dir, *common)))
        resumed = launch.train(make_plan(user_cfg(digits_dir, killed_dir, *common)))

    (resume,) = [e for e in read_jsonl(killed_dir / "events.jsonl") if e["event"] == "resume"]
    assert resume["from_step"] == 8
    ckpt = killed_dir / "checkpoints" / "step_00000008"
    manifest = commit.verify(ckpt)
    assert manifest["engines"] == ["teacher", "student"]
    for name in ("train/teacher_loss", "train/student_loss", "eval/student_accuracy"):
        rows = {n: read_jsonl(tmp_path / n / "metrics.jsonl") for n in ("unbroken", "killed")}
        series = {n: {r["step"]: r[name] for r in rows[n] if name in r} for n in rows}
        assert series["killed"] == series["unbroken"], name  # bitwise, both engines restored
    assert resumed["eval/teacher_accuracy"] == unbroken["eval/teacher_accuracy"]


@pytest.mark.timeout(300)
def test_a_task_updating_differently_per_rank_fails_clearly(digits_dir, tmp_path):
    cfg = user_cfg(digits_dir, tmp_path / "unequal", "task.name=userpkg.tasks:Unequal", "train.max_steps=4")
    with pytest.raises(launch.TrainingFailed, match="disagree on their updates"):
        launch.train(make_plan(cfg))
