"""`pipeline bench checkpoint`: our commit protocol's write bandwidth against `dd` in the same run, and
how long the training loop is blocked per checkpoint.

One process, DeepSpeed ZeRO-2 fp32 with AdamW (so a checkpoint holds weights + 2 optimizer moments:
about 12 bytes per parameter), saved with our commit protocol (stage tensors, background write hashed
with xxh3_128 on the way, fsync, MANIFEST, rename), asynchronously and synchronously. Medians of 5.
The rows issue 19 names: `checkpoint commit/dd` (goal ratio >= 0.7) and `checkpoint blocked/sync`
(goal ratio <= 0.1); the echoed phases say where an async save's time goes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.bench import median, row
from pipeline.net import free_port


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


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _recording_writer() -> Any:
    """A BackgroundWriter that keeps the file records of its last save (their write and fsync times)
    and the time the loop waited for its background staging copies (in Engine.step)."""
    from pipeline.checkpoint.writer import BackgroundWriter

    class Recording(BackgroundWriter):
        def __init__(self) -> None:
            super().__init__()
            self.last: dict[str, Any] = {}
            self.staged_wait_s = 0.0

        def wait_staged(self) -> None:
            start = time.perf_counter()
            super().wait_staged()
            self.staged_wait_s += time.perf_counter() - start

        def wait(self) -> Any:
            records, error = super().wait()
            if records:  # wait_idle() calls wait() again with nothing in flight
                self.last = records
            return records, error

    return Recording()


def run(
    params_m: float = 25.0, directory: Path | None = None, echo: Callable[[str], Any] = print
) -> list[dict[str, Any]]:
    """The checkpoint table for a model of `params_m` million parameters, written under `directory`
    (default: the temp dir). Runs a one-process gloo group of its own, torn down on the way out."""
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    port = free_port()
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        return _measure(params_m, Path(directory or tempfile.gettempdir()), echo)
    finally:
        torch.distributed.destroy_process_group()


def _measure(params_m: float, directory: Path, echo: Callable[[str], Any]) -> list[dict[str, Any]]:
    import torch
    from torch import nn

    from pipeline.checkpoint import commit
    from pipeline.config import OptimConfig, TrainConfig, ZeroConfig
    from pipeline.engine import build_engine

    width = int((params_m * 1e6 / 4) ** 0.5)
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
    step_s = median([_timed(train_step) for _ in range(5)])

    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=directory))
    writer = _recording_writer()
    common = {
        "is_rank0": True,
        "all_ok": lambda ok: ok,
        "writer": writer,
        "metadata": {"zero_stage": 2, "world_size": 1},
    }
    retention = commit.Retention(keep_last=1)

    def start(step: int) -> commit.PendingSave:
        return commit.start([engine], {"step": step}, work / "checkpoints", step, **common)

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
        # Save 0 allocates the staging buffers (once per run); then 5 rounds of: an async save alone
        # (bandwidth: total = until committed), an async save followed by a training step as in the
        # loop (blocked = `start`, which stages what a forward may change, + the step's wait for the
        # background copies of weights and optimizer state + the commit; lost = the step's wall time
        # over a plain step + `start` + the commit: the copies and the writes compete with the step for
        # the cores), a synchronous one (checkpoint.async_save=false: start and finish back to back),
        # commit lag 1, DeepSpeed's own save_checkpoint (no hashes, no fsync) for reference, and dd.
        blocked, staging, total, sync, deepspeed_s, dd, sizes, lag1 = [], [], [], [], [], [], [], []
        writes_done, commit_s, write_s, fsync_s, waited, lost = [], [], [], [], [], []
        step = 0

        def async_save(then_train: bool) -> dict[str, float]:
            nonlocal step
            step += 1
            writer.staged_wait_s = 0.0
            t0 = time.perf_counter()
            pending = start(step)
            t1 = time.perf_counter()
            if then_train:
                train_step()  # waits for the background copies before its optimizer step
            t_step = time.perf_counter()
            while not writer.done():  # the loop trains on meanwhile; it commits once the writes are done
                time.sleep(0.001)
            t_done = time.perf_counter()
            path = finish(pending)
            t2 = time.perf_counter()
            records = list(writer.last.values())
            out = {
                "staging": t1 - t0,
                "waited": writer.staged_wait_s,
                "step": t_step - t1,
                "writes": t_done - t_step,
                "commit": t2 - t_done,
                "total": t2 - t0,
                "size": tree_bytes(path),
                "write_s": sum(r.write_s for r in records),
                "fsync_s": sum(r.fsync_s for r in records),
            }
            writer.wait_idle()  # retention of the previous commit runs on the writer thread
            return out

        for round_ in range(6):
            alone = async_save(then_train=False)
            looped = async_save(then_train=True)
            step += 1
            t3 = time.perf_counter()
            finish(start(step))
            t4 = time.perf_counter()
            # max_commit_lag_steps=1 (the default): one training step overlaps the write, then the
            # loop waits for what is left of it and commits. Lost = that wall time minus a plain step.
            writer.wait_idle()
            step += 1
            t_a = time.perf_counter()
            pending = start(step)
            train_step()
            finish(pending)
            lag1.append(time.perf_counter() - t_a - step_s)
            writer.wait_idle()
            t5 = time.perf_counter()
            engine.ds.save_checkpoint(str(work / "deepspeed"), tag="plain")
            t6 = time.perf_counter()
            shutil.rmtree(work / "deepspeed")
            if round_ == 0:
                echo(
                    f"first save (allocates staging buffers): blocked {alone['staging']:.2f} s, "
                    f"total {alone['total']:.2f} s"
                )
                continue
            staging.append(looped["staging"])  # the loop's: what blocked/sync counts
            writes_done.append(alone["writes"])
            commit_s.append(looped["commit"])
            write_s.append(alone["write_s"])
            fsync_s.append(alone["fsync_s"])
            total.append(alone["total"])
            waited.append(looped["waited"])
            blocked.append(looped["staging"] + looped["waited"] + looped["commit"])
            lost.append(looped["staging"] + (looped["step"] - step_s) + looped["commit"])
            sync.append(t4 - t3)
            deepspeed_s.append(t6 - t5)
            sizes.append(alone["size"])
            dd.append(dd_mb_per_s(work, int(sizes[-1] / 1e6) + 1))
        size_mb = median(sizes) / 1e6
        dd_mb_s = median(dd)
        ours = size_mb / median(total)
        plain = size_mb / median(deepspeed_s)
        sync_s, blocked_s = median(sync), median(blocked)
        staging_s, waited_s, lost_s = median(staging), median(waited), median(lost)
        lag1_s = median(lag1)
        phases = [median(x) for x in (staging, writes_done, write_s, fsync_s, commit_s)]
    finally:
        writer.close()
        shutil.rmtree(work, ignore_errors=True)

    echo(
        f"model: {params / 1e6:.1f} M parameters, checkpoint {size_mb:.0f} MB (ZeRO-2, fp32, AdamW); "
        f"a training step (batch 64) takes {step_s:.3f} s"
    )
    echo(
        f"of the blocked time: staging what a forward may change {staging_s:.3f} s, the step's wait for "
        f"the background copies {waited_s:.3f} s; the rest: MANIFEST + rename"
    )
    echo(
        "an async save, phase by phase: staging {:.3f} s, then the background copies and writes {:.3f} s "
        "(two files at once; summed over files: torch.save + xxh3 into the page cache {:.3f} s, fsync "
        "{:.3f} s), then the commit (MANIFEST, fsync, rename) {:.3f} s".format(*phases)
    )
    echo(
        "medians of 5; ratios: MB/s against dd in the same rounds, blocked time against the synchronous save"
    )
    return [
        row("dd (fdatasync)", dd_mb_s, "MB/s"),
        # end to end: stage + torch.save hashed on the way + fsync + MANIFEST + rename
        row("checkpoint commit/dd", ours, "MB/s", dd_mb_s),
        row("DeepSpeed save_checkpoint alone (no hash, no fsync)", plain, "MB/s", dd_mb_s),
        row("synchronous save (async_save=false)", sync_s, "s"),
        row("loop time lost per save, commit lag 1 step (default)", lag1_s, "s", sync_s),
        # the loop blocked per async save with unbounded commit lag: staging, the wait for the
        # background copies, the commit
        row("checkpoint blocked/sync", blocked_s, "s", sync_s),
        # and its wall time lost: the blocked time plus the slowdown of the step that overlaps the copies
        # and the writes (the same 2 cores)
        row("loop time lost per save, unbounded commit lag", lost_s, "s", sync_s),
    ]
