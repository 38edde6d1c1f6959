"""Exact resume on token shards (issue 18): a run whose worker is SIGKILLed mid-epoch, re-run, logs the
same per-step losses, eval metrics and generated text as the run that was never interrupted (fp32,
bitwise) and ends on the same weights; a 2-worker checkpoint resumed by 1 worker continues.

A tiny LSTM language model (configs/lstm-lm-text.yaml) on 24,000 characters of real text, windows of
32: an epoch is 21 steps of 2 x 16 windows, so the 28 steps cross an epoch boundary after the kill."""

import shutil

import pytest
import torch

from pipeline import config, launch
from pipeline.checkpoint import commit, export
from pipeline.launch.plan import make_plan
from tests.helpers import read_jsonl, run_cli

pytestmark = pytest.mark.faults

RECIPE = "configs/lstm-lm-text.yaml"
MAX_STEPS = 28
# what the wall clock sets, and where a run writes its samples (their contents are compared apart)
TIMING = {"time", "train/samples_per_s", "train/data_wait_frac", "sys/peak_rss_mb", "samples/text"}


def small(text_dir, run_dir):
    return [
        f"data.train={text_dir}",
        f"run_dir={run_dir}",
        "cluster.launcher=local",
        "precision=fp32",
        "data.batch_size=16",
        "model.args={embedding_dim: 16, hidden_size: 32, num_layers: 2, dropout: 0.1, output: sequence}",
        "task.args.sample_tokens=24",
        f"train.max_steps={MAX_STEPS}",
        "optim.warmup_steps=2",
        "train.log_every=1",
        "train.eval_every=7",
        "checkpoint.every=4",
        "checkpoint.keep_last=10",
        "tracking.wandb.mode=disabled",
    ]


def rows_by_step(run_dir):
    """{step: train/ and eval/ metrics less the timing ones}; each step's train row logged once."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = [r["step"] for r in rows if "train/loss" in r]
    assert train == list(range(train[0], MAX_STEPS + 1))
    merged: dict[int, dict] = {}
    for row in rows:
        merged.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k not in TIMING})
    return merged


@pytest.fixture(scope="module")
def unbroken(text_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lm") / "unbroken"
    final = launch.train(make_plan(config.load(RECIPE, small(text_dir, run_dir))))
    assert final["step"] == MAX_STEPS
    return run_dir


@pytest.mark.timeout(600)
def test_a_worker_killed_mid_epoch_resumes_to_the_same_losses_text_and_weights(text_dir, unbroken, tmp_path):
    run_dir = tmp_path / "killed"
    args = ["train", RECIPE, *small(text_dir, run_dir)]
    killed = run_cli(*args, env={"PIPELINE_FAULTS": "kill@11:1"})  # SIGKILL of rank 1 at step 11
    assert killed.returncode == 1, killed.stderr[-3000:]
    assert "re-run" in killed.stderr
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (resume,) = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert resume["from_step"] == 8  # the newest commit before the kill: steps 9 and 10 are redone

    got, want = rows_by_step(run_dir), rows_by_step(unbroken)
    assert got.keys() == want.keys()
    for step in want:
        assert got[step] == want[step], f"step {step}"  # == on floats: bitwise
    assert any("eval/bpc" in want[s] for s in range(15, MAX_STEPS + 1))  # evals after the resume compared
    assert want[MAX_STEPS]["train/epoch"] >= 1  # the comparison crossed an epoch boundary
    for step in (14, 21, 28):  # the text generated at each eval after the resume: the same
        name = f"samples/step_{step:08d}.txt"
        assert (run_dir / name).read_text() == (unbroken / name).read_text()
    final = [
        export.consolidated_state_dict(d / "checkpoints" / f"step_{MAX_STEPS:08d}")
        for d in (run_dir, unbroken)
    ]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


@pytest.mark.timeout(600)
def test_a_2_worker_checkpoint_resumed_by_1_worker_continues(text_dir, unbroken, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(unbroken, run_dir)
    for ckpt in commit.committed(run_dir / "checkpoints"):
        if commit.read_manifest(ckpt)["step"] > 12:
            shutil.rmtree(ckpt)
    (run_dir / "metrics.jsonl").unlink()
    one = run_cli("train", RECIPE, *small(text_dir, run_dir), "cluster.num_workers=1")
    assert one.returncode == 0, one.stderr[-3000:]
    resume = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "resume"][-1]
    assert resume["from_step"] == 12
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(13, MAX_STEPS + 1))
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows)
    before = {r["step"]: r for r in read_jsonl(unbroken / "metrics.jsonl") if "train/samples_seen" in r}
    # one worker's batches from the checkpoint's sample count on
    assert rows[-1]["train/samples_seen"] == before[12]["train/samples_seen"] + 16 * (MAX_STEPS - 12)


@pytest.mark.timeout(300)
def test_generate_prints_the_same_continuation_for_the_same_seed_without_deepspeed(unbroken):
    def generate(*args):
        return run_cli("generate", str(unbroken), "--prompt", "The ", "--tokens", "60", *args)

    first, again, other = generate("--seed", "3"), generate("--seed", "3"), generate("--seed", "4")
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout == again.stdout and first.stdout != other.stdout
    assert first.stdout.startswith("The ") and len(first.stdout) == len("The ") + 60 + 1  # + newline
    unknown = generate("--prompt", "Zürich ¶")  # the last --prompt wins
    assert unknown.returncode == 2 and "not in the vocabulary" in unknown.stderr
