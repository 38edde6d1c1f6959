"""`pipeline bench loader`: how close does our stream come to the raw tar read and to the CPU's decode
rate?

In one run, on synthetic JPEG shards written to a temp dir (or a prepared dir of JPEG shards):
  (a) raw sequential tar read of all train shards (tarfile, payload bytes read)      samples/s
  (b) our stream without decoding (window plan + webdataset expansion + permutation)   samples/s
  (c) cores x single-core decode+augment+to-tensor rate (samples in memory)            samples/s
  (d) our stream with decode+augment, one DataLoader process per core, batches of 64    samples/s
and the ratios b/a (goal >= 0.5) and d/c (goal >= 0.8). Medians of 3.
"""

from __future__ import annotations

import os
import random
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.bench import median, row
from pipeline.config import AugmentConfig, DataConfig
from pipeline.data import cursor as cur
from pipeline.data import shards, sources, stream
from pipeline.data.shards import DataSpec


def raw_tar_read(urls: list[str]) -> tuple[int, float]:
    start, n = time.perf_counter(), 0
    for url in urls:
        with tarfile.open(url, "r|") as tar:
            for member in tar:
                payload = tar.extractfile(member).read()
                n += member.name.endswith(".cls") and len(payload) > 0
    return n, time.perf_counter() - start


def stream_without_decode(spec: DataSpec, buffer: int) -> tuple[int, float]:
    layout = cur.Layout(tuple(spec.train_counts), 0, True, buffer)
    cursor = cur.Cursor.fresh(1, 0)
    start, n = time.perf_counter(), 0
    for item in stream.reader_samples(spec.train_urls, layout, cursor, 0, {}, strict=True, infinite=False):
        n += item.sample is not None
    return n, time.perf_counter() - start


def single_core_decode(spec: DataSpec, aug: AugmentConfig, limit: int) -> tuple[int, float]:
    from pipeline.data.transforms import augment, decode_image, to_tensor

    samples = []
    for url in spec.train_urls:
        samples += stream.read_shard(url, {}, strict=True)[0]
        if len(samples) >= limit:
            break
    samples = samples[:limit]
    start = time.perf_counter()
    for i, sample in enumerate(samples):
        pixels = augment(decode_image(sample["jpg"]), aug, random.Random(i))
        to_tensor(pixels)
    return len(samples), time.perf_counter() - start


def full_stream(spec: DataSpec, workers: int, aug: AugmentConfig, buffer: int) -> tuple[int, float]:
    cfg = DataConfig(train="-", batch_size=64, num_workers=workers, shuffle_buffer=buffer, augment=aug)
    batches = stream.TrainBatches(spec, cfg, rank=0, world_size=1, seed=0)
    next(batches)  # loader processes started and warmed up: the steady state is what we compare
    target = spec.train_samples - 64 * workers * 2  # stay inside the first epoch
    start, n = time.perf_counter(), 0
    while n < target:
        n += len(next(batches).keys)
    elapsed = time.perf_counter() - start
    batches.close()
    return n, elapsed


def run(
    samples: int = 3000, size: str = "256x256", data: Path | None = None, echo: Callable[[str], Any] = print
) -> list[dict[str, Any]]:
    """The loader table; `data` is a prepared dir of JPEG shards (default: `samples` synthetic JPEGs
    of `size` pixels written to a temp dir)."""
    cores = os.cpu_count() or 1
    aug = AugmentConfig(crop_padding=8, hflip=True)
    buffer = 500

    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            data = Path(tmp) / "synthetic"
            t0 = time.perf_counter()
            shards.write_prepared(
                sources.load_source(f"synthetic-images:{samples}:{size}"),
                data,
                # shards of ~20 MB (4 at the default size), and at least one per loader process
                samples_per_shard=max(1, samples // (2 * cores)),
                shard_size_mb=20,
                val_fraction=0.05,
            )
            echo(f"prepared {samples} synthetic {size} JPEGs in {time.perf_counter() - t0:.1f} s")
        spec = shards.resolve(str(data), None)
        size_mb = sum(Path(u).stat().st_size for u in spec.train_urls) / 1e6
        echo(
            f"data: {spec.train_samples} train samples, {len(spec.train_urls)} shards, {size_mb:.0f} MB; "
            f"{cores} cores"
        )
        raw_tar_read(spec.train_urls)  # page cache warm for every measurement below
        measures = {
            "a": lambda: raw_tar_read(spec.train_urls),
            "b": lambda: stream_without_decode(spec, buffer),
            "c1": lambda: single_core_decode(spec, aug, 1000),
            "d": lambda: full_stream(spec, cores, aug, buffer),
        }
        rates = {}
        for name, measure in measures.items():  # median of 3: single runs on a shared VM are noisy
            rates[name] = median([n / seconds for n, seconds in (measure() for _ in range(3))])
        rates["c"] = rates["c1"] * cores

    echo(
        f"b/a = {rates['b'] / rates['a']:.2f} (goal >= 0.5)   "
        f"d/c = {rates['d'] / rates['c']:.2f} (goal >= 0.8)"
    )
    return [
        row("(a) raw tar read", rates["a"], "samples/s"),
        row("(b) stream, no decode", rates["b"], "samples/s", rates["a"]),
        row(f"(c) {cores} cores x 1-core decode+augment", rates["c"], "samples/s"),
        row(f"(d) stream, decode+augment, {cores} loader procs", rates["d"], "samples/s", rates["c"]),
    ]
