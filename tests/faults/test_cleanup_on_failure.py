"""A run that raises closes what it opened: after NonFiniteLoss or TooManyBadSamples no loader process
or checkpoint writer thread is left in the worker, and the W&B run is finished with a failing exit
code (so W&B shows it failed, not still running)."""

from __future__ import annotations

import os
import threading
from datetime import timedelta

import pytest
import torch.distributed as tdist
import torch.multiprocessing as mp

from pipeline import config
from pipeline.data.shards import DataSpec
from pipeline.launch.plan import make_plan, worker_payload
from pipeline.net import free_port
from tests.helpers import wandb_segments

pytestmark = pytest.mark.faults


def _probe(payload, faults, results):
    """One worker (world size 1): run the loop until it raises, then report what is still open."""
    import psutil

    from pipeline.training import loop

    port = free_port()
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PIPELINE_FAULTS": faults}
    os.environ |= {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    os.environ.pop("WANDB_MODE", None)  # the suite disables W&B; this test is about the W&B run too
    tdist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=60))
    cfg = config.from_dict(payload["config"])
    env = loop.WorkerEnv(rank=0, world_size=1, run_id=payload["run_id"])
    try:
        loop.run(cfg, DataSpec.from_dict(payload["spec"]), env)
        error = None
    except (loop.NonFiniteLoss, loop.TooManyBadSamples) as e:
        error = f"{type(e).__name__}: {e}"
    children = [" ".join(c.cmdline()) for c in psutil.Process().children(recursive=True) if c.is_running()]
    threads = [t.name for t in threading.enumerate() if t.name.startswith("ckpt-")]
    results.put((error, [c for c in children if "wandb" not in c], threads))
    tdist.destroy_process_group()


def run_until_it_fails(digits_dir, run_dir, faults, *overrides):
    cfg = config.load(
        "configs/smoke.yaml",
        [
            f"data.train={digits_dir}",
            f"run_dir={run_dir}",
            "cluster.launcher=local",
            "cluster.num_workers=1",
            "data.num_workers=2",  # loader processes that must not outlive the failure
            "precision=fp32",
            "train.max_steps=20",
            "optim.warmup_steps=2",
            "checkpoint.every=2",  # a save in flight (writer threads) when the failure comes
            "tracking.wandb.mode=offline",
            *overrides,
        ],
    )
    payload = worker_payload(make_plan(cfg), "cleanup")
    results = mp.get_context("spawn").SimpleQueue()
    process = mp.get_context("spawn").Process(target=_probe, args=(payload, faults, results))
    process.start()
    process.join(240)
    assert process.exitcode == 0, process.exitcode
    return results.get()


@pytest.mark.timeout(300)
def test_nonfinite_loss_leaves_nothing_open(digits_dir, tmp_path):
    run_dir = tmp_path / "nan"
    error, children, threads = run_until_it_fails(
        digits_dir, run_dir, "nan@3,nan@4", "train.max_nonfinite_steps=2"
    )
    assert error.startswith("NonFiniteLoss") and children == [] and threads == []
    (segment,) = wandb_segments(run_dir)
    assert segment["exit_code"] not in (None, 0)  # W&B knows this run failed


@pytest.mark.timeout(300)
def test_too_many_bad_samples_leaves_nothing_open(corrupt_digits, tmp_path):
    bad_data, _, _ = corrupt_digits  # 192 bad samples in the first shards
    run_dir = tmp_path / "bad"
    error, children, threads = run_until_it_fails(
        bad_data, run_dir, "", "data.on_error=skip", "data.max_skip_fraction=0.01", "data.shuffle_buffer=0"
    )
    assert error.startswith("TooManyBadSamples") and children == [] and threads == []
    (segment,) = wandb_segments(run_dir)
    assert segment["exit_code"] not in (None, 0)
