"""Issue 16, finding 6 (silent data loss), the parts a unit test can prove: corrupt commits set aside
and never the reason retention deletes a valid one, the tracker muting only its own line, resume=PATH
rolling back (and a restart continuing the rolled-back line), the run lock, a checkpoint of another
config refused, the best-metric default following the task, and the commit protocol's crash points."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import config, tasks
from pipeline.checkpoint import commit, lock, store
from pipeline.checkpoint.writer import BackgroundWriter
from pipeline.config import ConfigError
from pipeline.launch import plan as plan_mod
from pipeline.tracking import Tracker
from tests.helpers import read_jsonl


class FileEngine:
    """A SavesItself that writes one tensor file through the background writer."""

    name = "model"

    def __init__(self, value: float) -> None:
        self.value = value

    def save(self, directory, tag, writer=None):
        (Path(directory) / tag).mkdir(parents=True, exist_ok=True)
        writer.submit({"w": torch.full((4,), self.value)}, Path(directory) / tag / "w.pt")


def make_commit(root, step, *, retention=None, crash_point=None, metrics=None, value=None):
    """A real commit of `step` (start + finish in one process) under `root`."""
    writer = BackgroundWriter()
    try:
        pending = commit.start(
            [FileEngine(float(step if value is None else value))],
            {"step": step, "run_id": "aaaa"},
            root,
            step,
            is_rank0=True,
            all_ok=lambda ok: ok,
            writer=writer,
            metadata={"metrics": metrics or {}},
        )
        path = commit.finish(
            pending,
            is_rank0=True,
            all_ok=lambda ok: ok,
            gather=lambda obj: [obj],
            writer=writer,
            retention=retention,
            crash_point=crash_point,
        )
        writer.wait_idle()
    finally:
        writer.close()
    return path


def names(root):
    return [p.name for p in commit.committed(root)]


def corrupt(ckpt):
    target = next(p for p in sorted(Path(ckpt).rglob("*.pt")))
    target.write_bytes(b"x" + target.read_bytes()[1:])


# --- b. corrupt commits ---------------------------------------------------------------------------------


def test_a_corrupt_newest_commit_is_set_aside_and_retention_keeps_the_fresh_runs_commit(tmp_path):
    root = tmp_path / "checkpoints"
    corrupt(make_commit(root, 500))
    where = store.Store(root)
    warnings = []
    assert where.newest_verified(warnings.append) is None  # the preflight: read-only
    assert names(root) == ["step_00000500"]
    assert where.newest_verified(warnings.append, set_aside=True) is None  # the run's rank 0
    assert names(root) == [] and [p.name[:22] for p in root.glob("corrupt-*")] == ["corrupt-step_00000500-"]
    assert "set aside as corrupt-step_00000500-" in warnings[-1]
    # the fresh run's first commit is its only valid one: keep_last=1 keeps it (before: the corrupt
    # step_500 ranked newest by name and retention deleted step_100)
    make_commit(root, 100, retention=commit.Retention(keep_last=1))
    assert names(root) == ["step_00000100"]
    commit.verify(root / "step_00000100")


def test_an_unreadable_manifest_is_never_ranked_best(tmp_path):
    root = tmp_path / "checkpoints"
    for step, accuracy in [(10, 0.9), (20, 0.5)]:
        make_commit(root, step, metrics={"eval/accuracy": accuracy})
    (root / "step_00000010" / commit.MANIFEST).write_text("{torn")
    assert commit.ranked(names(root), lambda n: commit.read_manifest(root / n), "eval/accuracy", "max") == [
        "step_00000020"
    ]


def test_the_tracker_does_not_mute_a_fresh_line_over_an_old_runs_metrics(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "events.jsonl").write_text(json.dumps({"event": "start", "run_id": "old"}) + "\n")
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "x": s}) + "\n" for s in (1, 2, 500))
    )
    wandb = config.WandbConfig(mode="disabled")
    tracker = Tracker(run_dir, 10, wandb, {}, run_id="new", name="t")
    tracker.log(1, {"x": -1.0}, show=False)
    tracker.close()
    assert read_jsonl(run_dir / "metrics.jsonl")[0]["x"] == -1.0  # before: muted up to step 500
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.old.jsonl")] == [1, 2, 500]
    # a restart of the same line still replays silently (no step twice)
    (run_dir / "events.jsonl").write_text(json.dumps({"event": "start", "run_id": "new"}) + "\n")
    tracker = Tracker(run_dir, 10, wandb, {}, run_id="new", name="t")
    tracker.log(1, {"x": -2.0}, show=False)
    tracker.close()
    assert [r["x"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [-1.0]


# --- a. resume=PATH rolls back ---------------------------------------------------------------------------


def test_resume_path_sets_newer_commits_aside_and_a_restart_continues_the_rolled_back_line(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (4, 8, 12):
        make_commit(root, step)
    where = store.Store(root)
    target = store.resume_target(where, root / "step_00000004", warn=print)
    assert target.commit == root / "step_00000004" and target.newer == ["step_00000008", "step_00000012"]
    record = store.apply_resume_target(where, target, "PATH")
    assert names(root) == ["step_00000004"]  # nothing newer left for resume=auto or a Ray restart
    (abandoned,) = root.glob("abandoned-*")
    assert sorted(p.name for p in abandoned.iterdir()) == ["step_00000008", "step_00000012"]
    assert record["run_id"] and store.line_run_id(root, root / "step_00000004") == record["run_id"]
    # the rolled-back line commits step 8 again; the same command again (a requeue) continues it
    make_commit(root, 8, value=-8.0)
    again = store.resume_target(where, root / "step_00000004", warn=print)
    assert again.applied and again.commit == root / "step_00000008" and again.newer == []
    assert store.apply_resume_target(where, again, "PATH") is None
    assert len(list(root.glob("abandoned-*"))) == 1
    assert store.line_run_id(root, root / "step_00000008") is None  # its own state names the new line


def test_resume_auto_after_a_rollback_to_an_outside_commit_resumes_that_commit(tmp_path):
    other = tmp_path / "other"
    make_commit(other, 6)
    root = tmp_path / "checkpoints"
    for step in (4, 8):
        make_commit(root, step)
    where = store.Store(root)
    store.apply_resume_target(where, store.resume_target(where, other / "step_00000006", print), "PATH")
    assert names(root) == ["step_00000004"]
    assert store.continue_line(where, where.newest_verified(print)) == (other / "step_00000006").resolve()


# --- c. run lock and config changes ----------------------------------------------------------------------


def test_the_run_lock_names_its_holder_and_is_released(tmp_path):
    held = pytest.raises(lock.RunLocked, match=f"pid {os.getpid()} on host")
    with lock.hold(tmp_path / "run"), held, lock.hold(tmp_path / "run"):
        pass
    with lock.hold(tmp_path / "run"):  # released on exit
        pass


def test_a_killed_holders_lock_is_free_at_once(tmp_path):
    code = (
        "import sys, time; from pipeline.checkpoint import lock\n"
        f"with lock.hold({str(tmp_path / 'run')!r}, {str(tmp_path / 'ckpt')!r}):\n"
        "    print('held', flush=True); time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        held = pytest.raises(lock.RunLocked, match=rf"checkpoint dir .* pid {child.pid}")
        with held, lock.hold(tmp_path / "elsewhere", tmp_path / "ckpt"):
            pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with lock.hold(tmp_path / "run", tmp_path / "ckpt"):  # the kernel released it with the process
        pass


def cfg_with(**sections):
    return config.from_dict({"data": {"train": "/data"}, **sections})


def test_a_checkpoint_of_another_config_is_refused_naming_the_keys(tmp_path):
    ckpt = make_commit(tmp_path / "checkpoints", 4)
    manifest = commit.read_manifest(ckpt)
    manifest["training_config"] = store.training_config(cfg_with(optim={"lr": 1e-3}).to_dict())
    (ckpt / commit.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"optim.lr: 0.001 -> 0.002.*allow_config_change"):
        plan_mod.check_same_training(cfg_with(optim={"lr": 2e-3}), ckpt)
    # what may change on resume: steps, workers, tracking, checkpointing, paths
    plan_mod.check_same_training(
        cfg_with(
            optim={"lr": 1e-3},
            train={"max_steps": 5000, "eval_every": 7},
            cluster={"num_workers": 4},
            checkpoint={"every": 3, "keep_last": 9},
            run_dir="/elsewhere",
        ),
        ckpt,
    )
    plan_mod.check_same_training(cfg_with(optim={"lr": 2e-3}, checkpoint={"allow_config_change": True}), ckpt)


# --- d. the best metric follows the task -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "metric", "mode"),
    [
        ("classify", "eval/accuracy", "max"),
        ("autoencoder", "eval/recon_mse", "min"),
        ("vae", "eval/recon_mse", "min"),
        ("next_step", "eval/next_step_mse", "min"),
        ("gan", "eval/digit_score", "max"),
    ],
)
def test_the_best_metric_default_follows_the_task(task, metric, mode):
    cfg = cfg_with(task={"name": task})
    assert cfg.checkpoint.best_metric is None
    cls = tasks.task_class(task)
    assert tasks.best_of(cls, cfg.checkpoint.best_metric, cfg.checkpoint.best_mode) == (metric, mode)
    assert tasks.best_of(cls, "eval/loss", "min") == ("eval/loss", "min")


def test_a_best_metric_the_task_never_logs_is_refused():
    with pytest.raises(
        ConfigError, match=r"checkpoint.best_metric.*never logs eval/recon_mse.*eval/accuracy"
    ):
        plan_mod.check_best_metric(
            cfg_with(checkpoint={"best_metric": "eval/recon_mse"}), tasks.build("classify", {})
        )
    gan = tasks.build("gan", {})
    plan_mod.check_best_metric(cfg_with(task={"name": "gan"}), gan)  # keep_best=0: nothing ranks
    with pytest.raises(ConfigError, match=r"checkpoint.keep_best.*eval/d_real_accuracy.*score_classifier"):
        plan_mod.check_best_metric(cfg_with(task={"name": "gan"}, checkpoint={"keep_best": 1}), gan)
    plan_mod.check_best_metric(
        cfg_with(task={"name": "autoencoder"}, checkpoint={"keep_best": 2}), tasks.build("autoencoder", {})
    )


# --- e. the commit's crash points (process death, in a child) --------------------------------------------


def _crash_at(root, point, step, retention):
    def crash_point(name):
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)

    make_commit(root, step, retention=retention, crash_point=crash_point, value=-1.0)


@pytest.mark.parametrize(
    ("point", "step", "committed_after", "weights_of_8"),
    [
        ("after_manifest", 12, ["step_00000004", "step_00000008"], 8.0),
        ("after_old_aside", 8, ["step_00000004", "step_00000008"], 8.0),  # the old step 8 is back
        ("after_rename", 8, ["step_00000004", "step_00000008"], -1.0),  # the new step 8 stands
        ("in_retention", 12, ["step_00000008", "step_00000012"], 8.0),
    ],
)
def test_a_crash_at_each_point_of_the_commit_leaves_the_last_good_commit(
    tmp_path, point, step, committed_after, weights_of_8
):
    root = tmp_path / "checkpoints"
    for s in (4, 8):
        make_commit(root, s)
    retention = commit.Retention(keep_last=2) if point == "in_retention" else None
    child = multiprocessing.get_context("fork").Process(target=_crash_at, args=(root, point, step, retention))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    store.Store(root).remove_debris()  # what the next start does first
    assert names(root) == committed_after
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".lock") == []
    for name in committed_after:
        commit.verify(root / name)
    saved = torch.load(root / "step_00000008" / "engines" / "model" / "state" / "w.pt", weights_only=True)
    assert saved["w"][0].item() == weights_of_8


def test_retention_never_leaves_a_half_deleted_commit(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (4, 8, 12):
        make_commit(root, s)
    seen = []
    commit.apply_retention(
        root, commit.Retention(keep_last=1), crash_point=lambda n: seen.append(names(root))
    )
    assert seen == [["step_00000008", "step_00000012"], ["step_00000012"]]  # gone from the list at once
    assert names(root) == ["step_00000012"]


def test_a_corrupt_remote_commit_never_makes_retention_delete_a_valid_one(s3_endpoint, tmp_path):
    import s3fs

    options = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}
    s3 = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    s3.mkdir("corrupt-remote")
    url = "s3://corrupt-remote/run/checkpoints"
    old = store.Store(tmp_path / "old", url, options)
    old.remote.upload(make_commit(tmp_path / "old", 500))
    s3.pipe_file("corrupt-remote/run/checkpoints/step_00000500/trainer_state.json", b"{}")
    fresh = store.Store(tmp_path / "local", url, options)
    assert fresh.newest_verified(print, set_aside=True) is None  # the fresh run starts from step 0
    fresh.publish(make_commit(tmp_path / "local", 100), commit.Retention(keep_last=1))
    ((_, _url, error),) = fresh.finished_uploads(wait=True)
    assert error is None
    # before: retention counted the corrupt step_500 as newest and deleted the fresh run's step_100
    assert fresh.remote.committed() == ["step_00000100", "step_00000500"]
    assert names(tmp_path / "local") == ["step_00000100"]
