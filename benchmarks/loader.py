"""Loader benchmark: how close does our stream come to the raw tar read and to the CPU's decode rate?

In one run, on synthetic JPEG shards written to a temp dir (or --data DIR):
  (a) raw sequential tar read of all train shards (tarfile, payload bytes read)      samples/s
  (b) our stream without decoding (window plan + webdataset expansion + permutation)   samples/s
  (c) cores x single-core decode+augment+to-tensor rate (samples in memory)            samples/s
  (d) our stream with decode+augment, one DataLoader process per core, batches of 64    samples/s
and the ratios b/a (goal >= 0.5) and d/c (goal >= 0.8).

    python benchmarks/loader.py [--samples 3000] [--size 256x256] [--data DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from pipeline.config import AugmentConfig, DataConfig
from pipeline.data import cursor as cur
from pipeline.data import shards, sources, stream
from pipeline.data.transforms import augment, decode_image, to_tensor


def raw_tar_read(urls: list[str]) -> tuple[int, float]:
    start, n = time.perf_counter(), 0
    for url in urls:
        with tarfile.open(url, "r|") as tar:
            for member in tar:
                payload = tar.extractfile(member).read()
                n += member.name.endswith(".cls") and len(payload) > 0
    return n, time.perf_counter() - start


def stream_without_decode(spec: shards.DataSpec, buffer: int) -> tuple[int, float]:
    layout = cur.Layout(tuple(spec.train_counts), 0, True, buffer)
    cursor = cur.Cursor.fresh(1, 0)
    start, n = time.perf_counter(), 0
    for item in stream.reader_samples(spec.train_urls, layout, cursor, 0, {}, strict=True, infinite=False):
        n += item.sample is not None
    return n, time.perf_counter() - start


def single_core_decode(spec: shards.DataSpec, aug: AugmentConfig, limit: int) -> tuple[int, float]:
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


def full_stream(spec: shards.DataSpec, workers: int, aug: AugmentConfig, buffer: int) -> tuple[int, float]:
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--data", type=Path, help="a prepared dir of JPEG shards (default: synthesize one)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    aug = AugmentConfig(crop_padding=8, hflip=True)
    buffer = 500

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "synthetic"
            t0 = time.perf_counter()
            shards.write_prepared(
                sources.load_source(f"synthetic-images:{args.samples}:{args.size}"),
                data,
                samples_per_shard=10_000,
                shard_size_mb=20,
                val_fraction=0.05,
            )
            print(f"prepared {args.samples} synthetic {args.size} JPEGs in {time.perf_counter() - t0:.1f} s")
        spec = shards.resolve(str(data), None)
        size_mb = sum(Path(u).stat().st_size for u in spec.train_urls) / 1e6
        print(
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
            rates[name] = statistics.median(n / seconds for n, seconds in (measure() for _ in range(3)))
        rates["c"] = rates["c1"] * cores

    rows = [
        {
            "name": "(a) raw tar read",
            "value": rates["a"],
            "unit": "samples/s",
            "baseline": None,
            "ratio": None,
        },
        {
            "name": "(b) stream, no decode",
            "value": rates["b"],
            "unit": "samples/s",
            "baseline": rates["a"],
            "ratio": rates["b"] / rates["a"],
        },
        {
            "name": f"(c) {cores} cores x 1-core decode+augment",
            "value": rates["c"],
            "unit": "samples/s",
            "baseline": None,
            "ratio": None,
        },
        {
            "name": f"(d) stream, decode+augment, {cores} loader procs",
            "value": rates["d"],
            "unit": "samples/s",
            "baseline": rates["c"],
            "ratio": rates["d"] / rates["c"],
        },
    ]
    print(f"{'measure':48} {'samples/s':>12} {'ratio':>8}")
    for row in rows:
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else ""
        print(f"{row['name']:48} {row['value']:12.0f} {ratio:>8}")
    print(
        f"b/a = {rates['b'] / rates['a']:.2f} (goal >= 0.5)   "
        f"d/c = {rates['d'] / rates['c']:.2f} (goal >= 0.8)"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
