"""Checkpoint benchmark: our commit protocol's write bandwidth against `dd` in the same run, and how
long the training loop is blocked per checkpoint.

    python benchmarks/checkpoint.py [--params-m 50] [--dir /tmp] [--json FILE]

One process, DeepSpeed ZeRO-2 fp32 with AdamW (so a checkpoint holds weights + 2 optimizer moments:
about 12 bytes per parameter), saved 3 times with `pipeline.checkpoint.commit.save` (DeepSpeed write,
sha256 of every file, fsync, rename). Medians of 3.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def dd_mb_per_s(directory: Path, size_mb: int) -> float:
    target = directory / "dd.bin"
    proc = subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={size_mb}", "conv=fdatasync"],
        capture_output=True,
        text=True,
        check=True,
    )
    target.unlink()
    match = re.search(r"(\d+(?:\.\d+)?) s,", proc.stderr)
    return size_mb * 1.048576 / float(match.group(1))  # dd counts MiB; we report MB


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params-m", type=float, default=25.0, help="model size in millions of parameters")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)

    from pipeline.checkpoint import commit
    from pipeline.config import OptimConfig, TrainConfig, ZeroConfig
    from pipeline.engine import build_engine

    width = int((args.params_m * 1e6 / 4) ** 0.5)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])
    engine = build_engine(
        "model",
        model,
        optim=OptimConfig(),
        train=TrainConfig(),
        precision="fp32",
        zero=ZeroConfig(stage=2),
        raw={},
        micro_batch_size=8,
    )
    loss = engine(torch.randn(8, width)).pow(2).mean()  # one step, so the optimizer moments exist
    engine.backward(loss)
    engine.step()
    params = sum(p.numel() for p in model.parameters())

    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    try:
        seconds, sizes = [], []
        for i in range(3):
            start = time.perf_counter()
            path = commit.save(
                [engine],
                {"step": i},
                work / "checkpoints",
                i + 1,
                is_rank0=True,
                all_ok=lambda ok: ok,
                metadata={"zero_stage": 2, "world_size": 1},
                retention=commit.Retention(keep_last=1),
            )
            seconds.append(time.perf_counter() - start)
            sizes.append(tree_bytes(path))
        size_mb = statistics.median(sizes) / 1e6
        save_s = statistics.median(seconds)
        ours = size_mb / save_s
        dd = statistics.median(dd_mb_per_s(work, int(size_mb) + 1) for _ in range(3))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [
        {"name": "dd (fdatasync)", "value": dd, "unit": "MB/s", "baseline": None, "ratio": None},
        {
            "name": "checkpoint commit (write+sha256+fsync+rename)",
            "value": ours,
            "unit": "MB/s",
            "baseline": dd,
            "ratio": ours / dd,
        },
        {
            "name": "loop blocked per checkpoint",
            "value": save_s,
            "unit": "s",
            "baseline": save_s,
            "ratio": 1.0,
        },
    ]
    print(f"model: {params / 1e6:.1f} M parameters, checkpoint {size_mb:.0f} MB (ZeRO-2, fp32, AdamW)")
    print(f"{'measure':48} {'value':>10} {'unit':>6} {'ratio':>7}")
    for row in rows:
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else ""
        print(f"{row['name']:48} {row['value']:10.1f} {row['unit']:>6} {ratio:>7}")
    print("saves are synchronous: the loop waits for the whole commit (blocked/sync = 1.00)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
