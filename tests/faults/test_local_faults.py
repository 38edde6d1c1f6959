"""Faults injected into real 2-process runs (local launcher, gloo): NaN losses, a full disk, a crash in
the middle of a checkpoint write, and resuming at another world size."""

import json
import math
import time

import pytest
import torch

from pipeline import config, launch
from pipeline.checkpoint import commit, export
from pipeline.launch.plan import TrainingFailed, make_plan
from tests.helpers import LOCAL_SMALL_RUN, read_jsonl, run_cli

pytestmark = pytest.mark.faults

BASE = [*LOCAL_SMALL_RUN, "checkpoint.every=4", "checkpoint.keep_last=10"]


def cfg_for(digits_dir, run_dir, *extra):
    return config.load(
        "configs/smoke.yaml", [*BASE, f"data.train={digits_dir}", f"run_dir={run_dir}", *extra]
    )


def events(run_dir, kind=None):
    found = read_jsonl(run_dir / "events.jsonl")
    return [e for e in found if kind is None or e["event"] == kind]


@pytest.mark.timeout(300)
def test_a_nan_step_is_skipped_and_three_in_a_row_abort(digits_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_FAULTS", "nan@5,nan@5:1")  # rank 0 and rank 1 both see a NaN at step 5
    run_dir = tmp_path / "one"
    final = launch.train(make_plan(cfg_for(digits_dir, run_dir, "train.max_steps=8")))
    (skip,) = events(run_dir, "nonfinite")
    (commit4,) = [e for e in events(run_dir, "checkpoint_commit") if e["step"] == 4]
    assert skip["step"] == 5 and skip["weights"] == commit4["weights"]  # step 5 changed no weight
    assert final["step"] == 8 and math.isfinite(final["train/loss"])
    for ckpt in commit.committed(run_dir / "checkpoints"):  # nothing non-finite was ever committed
        weights = export.consolidated_state_dict(ckpt)
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())

    monkeypatch.setenv("PIPELINE_FAULTS", "nan@5:1,nan@6,nan@7:1")  # one rank's NaN is enough
    proc = run_cli(
        "train",
        "configs/smoke.yaml",
        *BASE,
        f"data.train={digits_dir}",
        f"run_dir={tmp_path / 'three'}",
        "train.max_steps=12",
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "3 steps in a row with a non-finite loss" in proc.stderr
    assert [e["step"] for e in events(tmp_path / "three", "nonfinite")] == [5, 6, 7]


@pytest.mark.timeout(300)
def test_zero0_discards_a_skipped_steps_gradients_and_clips_like_zero2(digits_dir, tmp_path, monkeypatch):
    """ZeRO-0 agrees on the skip during backward and then throws the gradients away, and clips the
    gradients itself; ZeRO-2 agrees before backward and DeepSpeed clips. Left-over step-5 gradients
    (added to step 6's by SGD) or a missing clip (the norm is ~10x the limit) would move the weights
    apart."""
    monkeypatch.setenv("PIPELINE_FAULTS", "nan@5:1")
    weights, norms = {}, {}
    for stage in (0, 2):
        run_dir = tmp_path / f"z{stage}"
        extra = ("train.max_steps=8", f"zero.stage={stage}", "optim.name=sgd", "train.clip_grad_norm=0.1")
        launch.train(make_plan(cfg_for(digits_dir, run_dir, *extra)))
        (skip,) = events(run_dir, "nonfinite")
        (commit4,) = [e for e in events(run_dir, "checkpoint_commit") if e["step"] == 4]
        assert skip["step"] == 5 and skip["weights"] == commit4["weights"]
        weights[stage] = export.consolidated_state_dict(commit.committed(run_dir / "checkpoints")[-1])
        norms[stage] = [
            r["train/grad_norm"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/grad_norm" in r
        ]
    assert len(norms[0]) == len(norms[2]) == 8 and min(norms[0]) > 0.5  # so 0.1 clips every step
    assert norms[0] == pytest.approx(norms[2], rel=1e-4)  # the norm before clipping, as DeepSpeed reports it
    floats = [k for k, t in weights[0].items() if t.is_floating_point()]
    assert floats and set(floats) <= set(weights[2])
    worst = max((weights[0][k] - weights[2][k]).abs().max().item() for k in floats)
    assert worst < 1e-5, f"ZeRO-0 and ZeRO-2 weights after a skipped step differ by {worst}"


def deepspeed_counters(ckpt):
    """DeepSpeed's own step counters as its checkpoint of the model engine recorded them."""
    # ZeRO-0/1/2: mp_rank_00_model_states.pt; ZeRO-3: zero_pp_rank_<r>_mp_rank_00_model_states.pt
    states = sorted((ckpt / "engines" / "model").glob("*/*mp_rank_00_model_states.pt"))[0]
    saved = torch.load(states, map_location="cpu", weights_only=False)  # written by this test's run
    return saved["global_steps"], saved["skipped_steps"]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_nan_micro_batch_under_accumulation_skips_its_whole_step(digits_dir, tmp_path, monkeypatch, stage):
    """train.grad_accum=2, the second micro-batch of step 5 is non-finite on rank 0. The step is skipped
    whole: the weights end equal to a run whose whole step 5 was non-finite, and DeepSpeed's update
    count is the loop's step count less the skipped step. (Before: the first micro-batch's gradient
    stayed, DeepSpeed's micro-step counter fell one behind, and every later update straddled two
    loop steps.)"""
    weights = {}
    for name, fault in (("micro", "nan@5.1"), ("whole", "nan@5")):
        monkeypatch.setenv("PIPELINE_FAULTS", fault)
        run_dir = tmp_path / name
        extra = ("train.max_steps=8", "train.grad_accum=2", f"zero.stage={stage}", "optim.name=sgd")
        final = launch.train(make_plan(cfg_for(digits_dir, run_dir, *extra)))
        (skip,) = events(run_dir, "nonfinite")
        assert skip["step"] == 5 and final["step"] == 8
        assert skip["weights"][1] > 0  # the checksum reads the weights (ZeRO-3 read none before)
        last = commit.committed(run_dir / "checkpoints")[-1]
        assert deepspeed_counters(last) == (7, 0)  # 8 loop steps, one skipped, none straddled
        weights[name] = export.consolidated_state_dict(last)
    floats = [k for k, t in weights["whole"].items() if t.is_floating_point()]
    worst = max((weights["micro"][k] - weights["whole"][k]).abs().max().item() for k in floats)
    assert worst == 0.0, f"a micro-batch skip and a whole-step skip end {worst} apart"


@pytest.mark.timeout(300)
def test_disk_full_keeps_the_previous_checkpoint_and_goes_on(digits_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_FAULTS", "enospc@8")
    run_dir = tmp_path / "run"
    final = launch.train(make_plan(cfg_for(digits_dir, run_dir, "train.max_steps=12")))
    (failed,) = events(run_dir, "checkpoint_failed")
    assert failed["step"] == 8 and "No space left on device" in failed["error"]
    assert [c.name for c in commit.committed(run_dir / "checkpoints")] == ["step_00000004", "step_00000012"]
    commit.verify(run_dir / "checkpoints" / "step_00000004")
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the partial write was removed
    assert final["step"] == 12

    monkeypatch.setenv("PIPELINE_FAULTS", "enospc@4,enospc@8,enospc@12")
    with pytest.raises(TrainingFailed, match="3 checkpoint save"):
        launch.train(make_plan(cfg_for(digits_dir, tmp_path / "full", "train.max_steps=16")))


@pytest.mark.timeout(300)
def test_crash_inside_a_checkpoint_write_resumes_from_the_previous_commit(digits_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("PIPELINE_FAULTS", "crash_in_save@8")
    with pytest.raises(TrainingFailed):
        launch.train(make_plan(cfg_for(digits_dir, run_dir, "train.max_steps=12")))
    assert (run_dir / "checkpoints" / ".tmp-step_00000008").is_dir()  # the debris of the killed save
    assert [c.name for c in commit.committed(run_dir / "checkpoints")] == ["step_00000004"]

    monkeypatch.delenv("PIPELINE_FAULTS")
    final = launch.train(make_plan(cfg_for(digits_dir, run_dir, "train.max_steps=12")))
    assert events(run_dir, "resume")[-1]["from_step"] == 4
    assert not (run_dir / "checkpoints" / ".tmp-step_00000008").exists()
    assert final["step"] == 12


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", [3])  # ZeRO-2 at 2 -> 1 workers: tests/faults/test_lm_resume.py
def test_world_size_change_2_to_1_to_2(digits_dir, tmp_path, stage):
    run_dir = tmp_path / "run"

    def segment(workers, steps):
        cfg = cfg_for(
            digits_dir,
            run_dir,
            f"zero.stage={stage}",
            f"cluster.num_workers={workers}",
            f"train.max_steps={steps}",
            "precision=bf16",
            "data.ledger=true",
        )
        return launch.train(make_plan(cfg))

    segment(2, 8)
    segment(1, 12)
    final = segment(2, 16)
    resumes = events(run_dir, "resume")
    assert [(r["from_step"], r["universal"]) for r in resumes] == [(8, True), (12, True)]
    commits = {e["step"]: e["weights"] for e in events(run_dir, "checkpoint_commit")}
    for resume in resumes:  # the weights right after each resume are the saved ones
        assert resume["weights"] == pytest.approx(commits[resume["from_step"]], rel=1e-9)
    assert final["step"] == 16 and math.isfinite(final["train/loss"])
    # the data cursor carried over the changes: 896 samples of epoch 0 (1,438), none seen twice
    keys = [
        k
        for rank in (0, 1)
        for line in read_jsonl(run_dir / "ledger" / f"rank{rank}.jsonl")
        for k in line["keys"]
    ]
    assert len(keys) == 8 * 64 + 4 * 32 + 4 * 64 == len(set(keys))


@pytest.mark.serial  # asserts a wall-time bound
@pytest.mark.timeout(300)
def test_a_hung_worker_fails_the_run_within_the_collective_timeout(digits_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_FAULTS", "hang@6:1")  # rank 1 stops answering at step 6
    start = time.monotonic()
    with pytest.raises(TrainingFailed):
        launch.train(
            make_plan(
                cfg_for(digits_dir, tmp_path / "run", "train.max_steps=12", "cluster.collective_timeout_s=10")
            )
        )
    elapsed_s = time.monotonic() - start
    # rank 0 times out in its next collective after 10 s; the hung process is killed after the
    # launcher's SIGTERM grace period (it treats SIGTERM as a preemption request)
    assert elapsed_s < 90, elapsed_s
    assert [c.name for c in commit.committed(tmp_path / "run" / "checkpoints")] == ["step_00000004"]


def test_retention_keeps_the_last_and_the_best(tmp_path):
    """Commits are plain directories with a MANIFEST: retention reads only that."""
    root = tmp_path / "checkpoints"
    for step, accuracy in [(10, 0.5), (20, 0.9), (30, 0.7), (40, 0.6), (50, 0.8)]:
        ckpt = root / commit.step_dir_name(step)
        ckpt.mkdir(parents=True)
        manifest = {
            "format": commit.FORMAT,
            "step": step,
            "metrics": {"eval/accuracy": accuracy},
            "files": {},
        }
        (ckpt / commit.MANIFEST).write_text(json.dumps(manifest))
    deleted = commit.apply_retention(root, commit.Retention(keep_last=2, keep_best=1))
    assert [p.name for p in commit.committed(root)] == ["step_00000020", "step_00000040", "step_00000050"]
    assert [p.name for p in deleted] == ["step_00000010", "step_00000030"]
    commit.apply_retention(root, commit.Retention(keep_last=1, keep_best=1, mode="min"))
    assert [p.name for p in commit.committed(root)] == ["step_00000040", "step_00000050"]
