"""The GPU tier: the smoke recipe on CUDA with NCCL, bf16 and fp16 with dynamic loss scaling, under
ZeRO-2 and ZeRO-3, through Ray (one worker per GPU, at most 2). Skipped without CUDA; run it on a GPU
machine with `pytest -m gpu tests/gpu`."""

import pytest
import torch

from pipeline import config, launch
from pipeline.launch.plan import make_plan
from tests.helpers import read_jsonl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU tier)"),
]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("stage", [2, 3])
def test_smoke_recipe_on_cuda_with_nccl(digits_dir, tmp_path, precision, stage):
    workers = min(2, torch.cuda.device_count())
    run_dir = tmp_path / "run"
    cfg = config.load(
        "configs/smoke.yaml",
        [
            f"data.train={digits_dir}",
            f"run_dir={run_dir}",
            f"precision={precision}",
            f"zero.stage={stage}",
            "cluster.use_gpu=true",
            f"cluster.num_workers={workers}",
            "cluster.cpus_per_worker=1",
        ],
    )
    final = launch.train(make_plan(cfg))
    assert final["eval/accuracy"] >= 0.95
    (start,) = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "start"]
    assert start["backend"] == "nccl" and not any(d.startswith("cpu") for d in start["devices"])
    logged = [m for m in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in m]
    assert all(m["sys/peak_gpu_mem_mb"] > 0 for m in logged)
    if precision == "fp16":  # dynamic loss scaling: the scale is logged, and it is a power of two
        scales = [m["train/loss_scale"] for m in logged]
        assert all(s > 0 and float(s).is_integer() for s in scales)
        assert all("train/overflow_steps" in m for m in logged)
