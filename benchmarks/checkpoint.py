"""Checkpoint benchmark: our commit protocol's write bandwidth against `dd` in the same run, and how
long the training loop is blocked per checkpoint.

    python benchmarks/checkpoint.py [--params-m 50] [--dir /tmp] [--json FILE]

One process, DeepSpeed ZeRO-2 fp32 with AdamW (so a checkpoint holds weights + 2 optimizer moments:
about 12 bytes per parameter), saved with our commit protocol (stage tensors, background write with
sha256 and fsync, MANIFEST, rename), asynchronously and synchronously. Medians of 3.
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


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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
    from pipeline.checkpoint.writer import BackgroundWriter
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
    batch = torch.randn(64, width)

    def train_step() -> None:
        loss = engine(batch).pow(2).mean()
        engine.backward(loss)
        engine.step()

    train_step()  # so the optimizer moments exist
    params = sum(p.numel() for p in model.parameters())
    step_s = statistics.median(_timed(train_step) for _ in range(5))

    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    writer = BackgroundWriter()
    common = {
        "is_rank0": True,
        "all_ok": lambda ok: ok,
        "writer": writer,
        "metadata": {"zero_stage": 2, "world_size": 1},
    }
    retention = commit.Retention(keep_last=1)

    def finish(pending: commit.PendingSave) -> Path:  # one process: agreement and gather are trivial
        return commit.finish(
            pending,
            is_rank0=True,
            all_ok=lambda ok: ok,
            gather=lambda o: [o],
            writer=writer,
            retention=retention,
        )

    try:
        # Save 0 allocates the staging buffers (once per run); then 3 rounds of: an async save (time
        # blocked = `start`, total = until committed), a synchronous one (checkpoint.async_save=false),
        # DeepSpeed's own save_checkpoint (no hashes, no fsync) for reference, and dd.
        blocked, staging, total, sync, deepspeed_s, dd, sizes, lag1 = [], [], [], [], [], [], [], []
        step = 0
        for round_ in range(4):
            step += 1
            t0 = time.perf_counter()
            pending = commit.start([engine], {"step": step}, work / "checkpoints", step, **common)
            t1 = time.perf_counter()
            while not writer.done():  # the loop trains on meanwhile; it commits once the writes are done
                time.sleep(0.001)
            t_done = time.perf_counter()
            path = finish(pending)
            t2 = time.perf_counter()
            size = tree_bytes(path)
            writer.wait_idle()  # retention of the previous commit runs on the writer thread
            step += 1
            t3 = time.perf_counter()
            commit.save(
                [engine],
                {"step": step},
                work / "checkpoints",
                step,
                gather=lambda o: [o],
                retention=retention,
                **common,
            )
            t4 = time.perf_counter()
            # max_commit_lag_steps=1 (the default): one training step overlaps the write, then the
            # loop waits for what is left of it and commits. Lost = that wall time minus a plain step.
            writer.wait_idle()
            step += 1
            t_a = time.perf_counter()
            pending = commit.start([engine], {"step": step}, work / "checkpoints", step, **common)
            train_step()
            finish(pending)
            lag1.append(time.perf_counter() - t_a - step_s)
            writer.wait_idle()
            t5 = time.perf_counter()
            engine.ds.save_checkpoint(str(work / "deepspeed"), tag="plain")
            t6 = time.perf_counter()
            shutil.rmtree(work / "deepspeed")
            if round_ == 0:
                print(
                    f"first save (allocates staging buffers): blocked {t1 - t0:.2f} s, total {t2 - t0:.2f} s"
                )
                continue
            staging.append(t1 - t0)
            blocked.append((t1 - t0) + (t2 - t_done))  # staging, then the commit (MANIFEST, rename)
            total.append(t2 - t0)
            sync.append(t4 - t3)
            deepspeed_s.append(t6 - t5)
            sizes.append(size)
            dd.append(dd_mb_per_s(work, int(sizes[-1] / 1e6) + 1))
        size_mb = statistics.median(sizes) / 1e6
        dd_mb_s = statistics.median(dd)
        ours = size_mb / statistics.median(total)
        plain = size_mb / statistics.median(deepspeed_s)
        sync_s, blocked_s = statistics.median(sync), statistics.median(blocked)
        staging_s = statistics.median(staging)
        lag1_s = statistics.median(lag1)
    finally:
        writer.close()
        shutil.rmtree(work, ignore_errors=True)

    rows = [
        {"name": "dd (fdatasync)", "value": dd_mb_s, "unit": "MB/s", "baseline": None, "ratio": None},
        {
            "name": "checkpoint commit (stage+write+sha256+fsync+rename)",
            "value": ours,
            "unit": "MB/s",
            "baseline": dd_mb_s,
            "ratio": ours / dd_mb_s,
        },
        {
            "name": "DeepSpeed save_checkpoint alone (no hash, no fsync)",
            "value": plain,
            "unit": "MB/s",
            "baseline": dd_mb_s,
            "ratio": plain / dd_mb_s,
        },
        {
            "name": "synchronous save (async_save=false)",
            "value": sync_s,
            "unit": "s",
            "baseline": None,
            "ratio": None,
        },
        {
            "name": "loop time lost per save, commit lag 1 step (default)",
            "value": lag1_s,
            "unit": "s",
            "baseline": sync_s,
            "ratio": lag1_s / sync_s,
        },
        {
            "name": "loop blocked per save, unbounded commit lag",
            "value": blocked_s,
            "unit": "s",
            "baseline": sync_s,
            "ratio": blocked_s / sync_s,
        },
    ]
    print(
        f"model: {params / 1e6:.1f} M parameters, checkpoint {size_mb:.0f} MB (ZeRO-2, fp32, AdamW); "
        f"a training step (batch 64) takes {step_s:.3f} s"
    )
    print(f"{'measure':56} {'value':>10} {'unit':>6} {'ratio':>7}")
    for row in rows:
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else ""
        print(f"{row['name']:56} {row['value']:10.2f} {row['unit']:>6} {ratio:>7}")
    print(f"of the blocked time, staging the tensors: {staging_s:.3f} s; the rest: MANIFEST + rename")
    print(
        "medians of 3; ratios: MB/s against dd in the same rounds, blocked time against the synchronous save"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
