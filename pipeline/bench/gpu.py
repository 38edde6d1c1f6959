"""`pipeline bench gpu`, for a machine with CUDA: ResNet-50 at 224 px with bf16, measured three ways in
one run, plus the LSTM recipe.

1. peak: a large bf16 matmul (TFLOP/s): the ceiling MFU is measured against, on this GPU.
2. in-memory loop: plain PyTorch (no DDP wrapper, no DeepSpeed), synthetic batches already on the GPU,
   channels-last, bf16 autocast, SGD with momentum: images/s and MFU (3 x 8.22 GFLOP per image for
   forward + backward at 224 px).
3. pipeline: `pipeline train` with resnet50 on WebDataset shards of synthetic 224x224 JPEGs (decoded
   by the loader processes), one Ray worker on one GPU, ZeRO-0 and ZeRO-2: images/s from metrics.jsonl
   (steady-state windows), as a ratio of the in-memory loop, and the input stall.
4. the same ZeRO-2 run with `train.compile=true`: s/step against eager (`compile resnet50` row).
5. the LSTM recipe (rows of MNIST) under `pipeline train`, samples/s.

NVIDIA DeepLearningExamples report 2,470 images/s for ResNet-50 (AMP, batch 256) on one A100 80GB;
scale it by the ratio of this GPU's measured bf16 peak to the A100's 312 TFLOP/s for a like-for-like
goal (the baseline of the in-memory row).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.bench import BenchError, find_config, median, row

# forward: 4.11 G multiply-adds at 224 px = 8.22 GFLOP (2 FLOP each, as the matmul peak counts them);
# backward ~2x forward
RESNET50_TRAIN_FLOP_PER_IMAGE = 3 * 2 * 4.11e9
A100_BF16_PEAK = 312e12
DLE_A100_IMAGES_PER_S = 2470


def check() -> None:
    """Raise BenchError unless CUDA is there (before anything is prepared or started)."""
    import torch

    if not torch.cuda.is_available():
        raise BenchError("`pipeline bench gpu` needs CUDA (a GPU and a CUDA build of torch); none found here")


def matmul_peak_flops(n: int = 8192, iters: int = 50) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - start)


def in_memory_images_per_s(batch: int, steps: int = 40, warmup: int = 10) -> float:
    import torch

    from pipeline import models

    torch.backends.cudnn.benchmark = True
    model = models.build("resnet50", {"stem": "imagenet"}, [3, 224, 224], 1000).cuda()
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    loss_fn = torch.nn.CrossEntropyLoss()
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def pipeline_run(config: str, overrides: list[str], run_dir: Path) -> tuple[float, float]:
    """(median samples/s, median data-wait fraction) over the steady-state log windows of a
    `pipeline train` run in a process of its own (it owns the GPU while it runs)."""
    path = find_config(config)
    cmd = [sys.executable, "-m", "pipeline", "train", str(path), f"run_dir={run_dir}", *overrides]
    subprocess.run(cmd, cwd=path.parents[1], check=True, env={**os.environ, "WANDB_MODE": "disabled"})
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "train/samples_per_s" in r][2:]  # warm-up windows dropped
    return (
        median([r["train/samples_per_s"] for r in windows]),
        median([r["train/data_wait_frac"] for r in windows]),
    )


def run(
    mnist: Path,
    images: int = 20000,
    batch: int = 256,
    loader_workers: int | None = None,
    echo: Callable[[str], Any] = print,
) -> list[dict[str, Any]]:
    """The GPU table; `mnist` is a prepared MNIST-5k dir (for the LSTM recipe)."""
    import torch

    from pipeline.data import shards, sources

    check()
    mnist = mnist.resolve()  # `pipeline train` runs in the checkout
    loader_workers = loader_workers or max(1, (os.cpu_count() or 2) - 2)
    gpu = torch.cuda.get_device_name()
    peak = matmul_peak_flops()
    memory = in_memory_images_per_s(batch)
    mfu = memory * RESNET50_TRAIN_FLOP_PER_IMAGE / peak
    goal = DLE_A100_IMAGES_PER_S * peak / A100_BF16_PEAK
    echo(
        f"goal for the in-memory loop: DeepLearningExamples' A100 {DLE_A100_IMAGES_PER_S} img/s x peak / 312"
    )
    rows = [
        row(f"bf16 matmul peak ({gpu})", peak / 1e12, "TFLOP/s"),
        row("ResNet-50 in-memory loop", memory, "img/s", goal),
        row("ResNet-50 in-memory MFU", mfu, "fraction"),
    ]
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        data = Path(tmp) / "jpeg"
        source = sources.load_source(f"synthetic-images:{images}:224x224")
        # at least one train shard per loader process (the run refuses fewer); 1,000 when that allows
        per_shard = min(1000, max(1, images * 3 // 4 // loader_workers))
        shards.write_prepared(source, data, samples_per_shard=per_shard)
        common = [
            f"data.train={data}",
            f"data.batch_size={batch}",
            f"data.num_workers={loader_workers}",
            "data.shuffle_buffer=1000",
            "model.name=resnet50",
            "model.args={stem: imagenet}",
            "cluster.use_gpu=true",
            "cluster.num_workers=1",
            f"cluster.cpus_per_worker={loader_workers + 1}",
            "train.max_steps=120",
            "train.log_every=20",
            "train.eval_every=0",
            "checkpoint.every=0",
            "optim.warmup_steps=1",
            "precision=bf16",
        ]
        for stage in (0, 2):
            images_per_s, stall = pipeline_run(
                "resnet18-mnist5k", [*common, f"zero.stage={stage}"], Path(tmp) / f"z{stage}"
            )
            rows.append(row(f"ResNet-50 pipeline ZeRO-{stage} (JPEG shards)", images_per_s, "img/s", memory))
            rows.append(row(f"  input stall ZeRO-{stage}", stall, "fraction"))
        # train.compile on the same run as ZeRO-2 (its first windows, which compile, are warm-up)
        compiled, _ = pipeline_run(
            "resnet18-mnist5k", [*common, "zero.stage=2", "train.compile=true"], Path(tmp) / "compiled"
        )
        eager = next(r["value"] for r in rows if r["name"].startswith("ResNet-50 pipeline ZeRO-2"))
        # ratio of s/step, compiled over eager, as `compile <recipe>` rows are everywhere
        rows.append(row("compile resnet50 (GPU, ZeRO-2)", batch / compiled, "s/step", batch / eager))
        lstm_per_s, _ = pipeline_run(
            "lstm-rows-mnist5k",
            [
                f"data.train={mnist}",
                "cluster.use_gpu=true",
                "cluster.num_workers=1",
                "train.max_steps=300",
                "train.log_every=50",
                "train.eval_every=0",
                "checkpoint.every=0",
            ],
            Path(tmp) / "lstm",
        )
        rows.append(row("LSTM rows recipe (pipeline, ZeRO-2)", lstm_per_s, "samples/s"))
    return rows
