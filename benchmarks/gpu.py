"""GPU throughput, for a machine with CUDA: ResNet-50 at 224 px with bf16, measured three ways in one
run, plus the LSTM recipe.

    python benchmarks/gpu.py [--images 20000] [--batch 256] [--json FILE]

1. peak: a large bf16 matmul (TFLOP/s): the ceiling MFU is measured against, on this GPU.
2. in-memory loop: plain PyTorch (no DDP wrapper, no DeepSpeed), synthetic batches already on the GPU,
   channels-last, bf16 autocast, SGD with momentum: images/s and MFU (3 x 4.11 GFLOP per image for
   forward + backward at 224 px).
3. pipeline: `pipeline train` with resnet50 on WebDataset shards of synthetic 224x224 JPEGs (decoded
   by the loader processes), one Ray worker on one GPU, ZeRO-0 and ZeRO-2: images/s from metrics.jsonl
   (steady-state windows), as a ratio of the in-memory loop, and the input stall.
4. the LSTM recipe (rows of MNIST) under `pipeline train`, samples/s.

NVIDIA DeepLearningExamples report 2,470 images/s for ResNet-50 (AMP, batch 256) on one A100 80GB;
scale it by the ratio of this GPU's measured bf16 peak to the A100's 312 TFLOP/s for a like-for-like
goal (printed in the table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESNET50_TRAIN_FLOP_PER_IMAGE = 3 * 4.11e9  # forward ~4.11 GFLOP at 224 px; backward ~2x forward
A100_BF16_PEAK = 312e12
DLE_A100_IMAGES_PER_S = 2470


def matmul_peak_flops(n: int = 8192, iters: int = 50) -> float:
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
    sys.path.insert(0, str(REPO))
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


def prepare(source: str, out: Path, samples_per_shard: int) -> None:
    cmd = ["data", "prepare", source, "--out", str(out), "--samples-per-shard", str(samples_per_shard)]
    subprocess.run([sys.executable, "-m", "pipeline", *cmd], cwd=REPO, check=True)


def pipeline_run(config: str, overrides: list[str], run_dir: Path) -> tuple[float, float]:
    """(median samples/s, median data-wait fraction) over the steady-state log windows."""
    cmd = [sys.executable, "-m", "pipeline", "train", config, f"run_dir={run_dir}", *overrides]
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "WANDB_MODE": "disabled"})
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "train/samples_per_s" in r][2:]  # warm-up windows dropped
    return (
        statistics.median(r["train/samples_per_s"] for r in windows),
        statistics.median(r["train/data_wait_frac"] for r in windows),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=20000, help="synthetic JPEGs for the pipeline runs")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--loader-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs CUDA")
    gpu = torch.cuda.get_device_name()
    peak = matmul_peak_flops()
    memory = in_memory_images_per_s(args.batch)
    mfu = memory * RESNET50_TRAIN_FLOP_PER_IMAGE / peak
    goal = DLE_A100_IMAGES_PER_S * peak / A100_BF16_PEAK
    rows = [
        {"name": f"bf16 matmul peak ({gpu})", "value": peak / 1e12, "unit": "TFLOP/s"},
        {"name": "ResNet-50 in-memory loop", "value": memory, "unit": "img/s", "baseline": goal},
        {"name": "ResNet-50 in-memory MFU", "value": mfu, "unit": "fraction"},
    ]
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        data = Path(tmp) / "jpeg"
        prepare(f"synthetic-images:{args.images}:224x224", data, 1000)
        common = [
            f"data.train={data}",
            f"data.batch_size={args.batch}",
            f"data.num_workers={args.loader_workers}",
            "data.shuffle_buffer=1000",
            "model.name=resnet50",
            "model.args={stem: imagenet}",
            "cluster.use_gpu=true",
            "cluster.num_workers=1",
            f"cluster.cpus_per_worker={args.loader_workers + 1}",
            "train.max_steps=120",
            "train.log_every=20",
            "train.eval_every=0",
            "checkpoint.every=0",
            "optim.warmup_steps=1",
            "precision=bf16",
        ]
        for stage in (0, 2):
            images_per_s, stall = pipeline_run(
                "configs/resnet18-mnist5k.yaml", [*common, f"zero.stage={stage}"], Path(tmp) / f"z{stage}"
            )
            rows.append(
                {
                    "name": f"ResNet-50 pipeline ZeRO-{stage} (JPEG shards)",
                    "value": images_per_s,
                    "unit": "img/s",
                    "baseline": memory,
                }
            )
            rows.append({"name": f"  input stall ZeRO-{stage}", "value": stall, "unit": "fraction"})
        mnist = Path(tmp) / "mnist5k"
        prepare("mnist5k", mnist, 250)
        lstm_per_s, _ = pipeline_run(
            "configs/lstm-rows-mnist5k.yaml",
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
        rows.append({"name": "LSTM rows recipe (pipeline, ZeRO-2)", "value": lstm_per_s, "unit": "samples/s"})
    for r in rows:
        r.setdefault("baseline", None)
        r["ratio"] = r["value"] / r["baseline"] if r["baseline"] else None
        ratio = f"  ratio {r['ratio']:.3f}" if r["ratio"] else ""
        print(f"{r['name']:48} {r['value']:12,.3f} {r['unit']}{ratio}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
