"""`pipeline bench loader`: how close does our stream come to the raw tar read and to the CPU's decode
rate?

In one run, on synthetic JPEG shards written to a temp dir (or a prepared dir of JPEG shards):
  (a) raw sequential tar read of all train shards (tarfile, payload bytes read)      samples/s
  (b) our stream without decoding (window plan + webdataset expansion + permutation)   samples/s
  (c) cores x single-core decode+augment+to-tensor rate (samples in memory)            samples/s
  (d) our stream with decode+augment, one DataLoader process per core, batches of 64    samples/s
and the ratios b/a (goal >= 0.5) and d/c (goal >= 0.8). Medians of 3. Where a loader process's time
goes (CPU us per sample: tar parsing and plan, decode, augment into the batch; the loader processes and
the consumer during (d)) is printed beside them.

Memory that does not grow with the data: N and 10N small synthetic images (N = --samples, 32x32 PNGs)
streamed for two epochs through `TrainBatches` with data.cache_mb = half the N set's decoded size (both
runs fill the cache; the 10N set is 20x data.cache_mb), each in a fresh process: the peak RSS of the
loader processes (the largest) and of the consumer, 10N against N (goal: within 5%).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.bench import median, row
from pipeline.config import AugmentConfig, DataConfig
from pipeline.data import cursor as cur
from pipeline.data import shards, sources, stream
from pipeline.data.shards import DataSpec
from pipeline.data.transforms import encode_png


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

    samples = first_train_samples(spec, limit)
    with one_thread():
        start = time.perf_counter()
        for i, sample in enumerate(samples):
            pixels = augment(decode_image(sample["jpg"]), aug, random.Random(i))
            to_tensor(pixels)
        return len(samples), time.perf_counter() - start


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One torch intra-op thread, as in a DataLoader process: a single core's rate, measured as the
    loader processes run (`transforms.apply_crop` uses torch's flip only then)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def first_train_samples(spec: DataSpec, limit: int) -> list[dict]:
    samples: list[dict] = []
    for url in spec.train_urls:
        samples += stream.read_shard(url, {}, strict=True)[0]
        if len(samples) >= limit:
            break
    return samples[:limit]


def cpu_s(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def full_stream(
    spec: DataSpec, workers: int, aug: AugmentConfig, buffer: int, cpu: list[dict] | None = None
) -> tuple[int, float]:
    """(samples, seconds) of the steady state; `cpu` gets the CPU us per sample of the loader processes
    (their whole life: start, warm-up and read-ahead included) and of the consumer (the timed loop)."""
    cfg = DataConfig(train="-", batch_size=64, num_workers=workers, shuffle_buffer=buffer, augment=aug)
    children_start = cpu_s(resource.RUSAGE_CHILDREN)
    batches = stream.TrainBatches(spec, cfg, rank=0, world_size=1, seed=0)
    warm = len(next(batches).keys)  # loader processes started and warmed up: the steady state is compared
    target = spec.train_samples - 64 * workers * 2  # stay inside the first epoch
    consumer_start, start, n = cpu_s(resource.RUSAGE_SELF), time.perf_counter(), 0
    while n < target:
        n += len(next(batches).keys)
    elapsed = time.perf_counter() - start
    consumer = cpu_s(resource.RUSAGE_SELF) - consumer_start
    batches.close()  # joins the loader processes: their CPU time is in RUSAGE_CHILDREN from here on
    if cpu is not None:
        loaders = cpu_s(resource.RUSAGE_CHILDREN) - children_start
        cpu.append({"loaders": 1e6 * loaders / (n + warm), "consumer": 1e6 * consumer / n})
    return n, elapsed


def piece_costs(spec: DataSpec, aug: AugmentConfig, limit: int) -> dict[str, float]:
    """CPU us per sample of each piece of a loader process's work, measured in this thread."""
    from pipeline.data.decode import Decoder

    layout = cur.Layout(tuple(spec.train_counts[:1]), 0, True, limit)
    start, n = time.thread_time(), 0
    for _ in stream.reader_samples(spec.train_urls[:1], layout, cur.Cursor.fresh(1, 0), 0, {}, True, False):
        n += 1
    tar = (time.thread_time() - start) / n
    samples, decoder = first_train_samples(spec, limit), Decoder(spec, aug, 0)
    x, _ = stream.batch_tensor(64, *stream.slot_shape(decoder.prepare(dict(samples[0]), 0)[0]))
    with one_thread():
        decode, place = batch_costs(samples, decoder, x)
    return {"tar+plan": 1e6 * tar, "decode": 1e6 * decode, "augment into batch": 1e6 * place}


def batch_costs(samples: list[dict], decoder: Any, x: Any) -> tuple[float, float]:
    """CPU seconds per sample to decode, and to augment into the batch `x`, a batch at a time."""
    for _ in range(2):  # the first pass pays the page faults of new memory, which loader processes reuse
        decode = place = 0.0
        for first in range(0, len(samples), 64):  # a batch at a time, as in a loader process
            start = time.thread_time()
            prepared = [decoder.prepare(dict(sample), 0) for sample in samples[first : first + 64]]
            decode += time.thread_time() - start
            start = time.thread_time()
            for slot, (value, _, crop) in zip(x, prepared, strict=False):
                stream.place(value, crop, slot)
            place += time.thread_time() - start
    return decode / len(samples), place / len(samples)


@dataclass
class NoiseImages(sources.Source):
    """Random RGB PNGs made per sample (no array of the whole set in memory), for the memory test."""

    side: int = 32

    def payload(self, i: int) -> tuple[str, bytes]:
        return "png", encode_png(self.decoded(i))

    def decoded(self, i: int) -> np.ndarray:
        return np.random.default_rng((1, i)).integers(0, 256, (self.side, self.side, 3), dtype=np.uint8)

    def stats(self) -> tuple[list[float], list[float]]:  # uniform noise: no need to decode a sample
        return [0.5] * 3, [0.2887] * 3


def write_noise(out: Path, count: int, side: int = 32) -> Path:
    labels = np.random.default_rng(0).integers(0, 10, count).astype(np.int64)
    source = NoiseImages(f"noise{side}", labels, [str(i) for i in range(10)], "image", side)
    # The same shard size for every count: a loader process holds one window of shards at a time.
    shards.write_prepared(source, out, samples_per_shard=100, val_fraction=0.02)
    return out


def streamed_peak_rss(data: Path, workers: int, cache_mb: float, epochs: int = 2) -> dict[str, float]:
    """Peak RSS (MB) of the consumer and of the largest loader process when `data` is streamed for
    `epochs` epochs in a fresh process (nothing else in it was ever larger)."""
    code = (
        "import json, sys; from pipeline.bench.loader import rss_child; rss_child(**json.loads(sys.argv[1]))"
    )
    args = json.dumps({"data": str(data), "workers": workers, "cache_mb": cache_mb, "epochs": epochs})
    proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the memory measurement failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def rss_child(data: str, workers: int, cache_mb: float, epochs: int) -> None:
    """Runs in the fresh process of `streamed_peak_rss`; prints its result as JSON."""
    spec = shards.resolve(data, None)
    aug = AugmentConfig(crop_padding=4, hflip=True)
    cfg = DataConfig(
        train="-", batch_size=64, num_workers=workers, shuffle_buffer=500, cache_mb=cache_mb, augment=aug
    )
    batches = stream.TrainBatches(spec, cfg, rank=0, world_size=1, seed=0)
    n, start = 0, time.perf_counter()
    while n < epochs * spec.train_samples:
        n += len(next(batches).keys)
    batches.close()  # joins the loader processes: RUSAGE_CHILDREN's maxrss is the largest of them
    result = {
        "consumer_mb": own_peak_rss_mb(),
        "loader_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,  # KB on Linux
        "samples": n,
        "seconds": time.perf_counter() - start,
    }
    print(json.dumps(result))


def own_peak_rss_mb() -> float:
    """This process's peak RSS. Not RUSAGE_SELF: Linux keeps the larger maxrss of the process image
    before exec, here the bench process that started this one (~440 instead of ~240 MB)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_rows(tmp: Path, samples: int, workers: int, echo: Callable[[str], Any]) -> list[dict[str, Any]]:
    """Peak RSS streaming N and 10N samples, data.cache_mb = half the N set's decoded size: each loader
    process reads more than that in two epochs, so the cache fills in both runs (the 10N set is 20x
    data.cache_mb) and any difference is memory that grows with the data."""
    side = 32
    cache_mb = samples * side * side * 3 / 2 / 2**20
    t0 = time.perf_counter()
    small, large = (
        write_noise(tmp / "rss-1x", samples, side),
        write_noise(tmp / "rss-10x", 10 * samples, side),
    )
    echo(
        f"memory: {samples} and {10 * samples} {side}x{side} PNGs written in {time.perf_counter() - t0:.1f} s"
    )
    peaks = {}
    for name, data in (("1x", small), ("10x", large)):
        peaks[name] = streamed_peak_rss(data, workers, cache_mb)
        echo(
            f"memory {name}: {peaks[name]['samples']} samples streamed (2 epochs, data.cache_mb "
            f"{cache_mb:.1f}) in {peaks[name]['seconds']:.1f} s; peak RSS: loader process "
            f"{peaks[name]['loader_mb']:.0f} MB, consumer {peaks[name]['consumer_mb']:.0f} MB"
        )
    return [
        row("loader peak RSS 10x data", peaks["10x"]["loader_mb"], "MB", peaks["1x"]["loader_mb"]),
        row(
            "loader consumer peak RSS 10x data", peaks["10x"]["consumer_mb"], "MB", peaks["1x"]["consumer_mb"]
        ),
    ]


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
        cpu: list[dict] = []
        measures = {
            "a": lambda: raw_tar_read(spec.train_urls),
            "b": lambda: stream_without_decode(spec, buffer),
            "c1": lambda: single_core_decode(spec, aug, 1000),
            "d": lambda: full_stream(spec, cores, aug, buffer, cpu),
        }
        runs: dict[str, list[float]] = {name: [] for name in measures}
        for _ in range(3):  # median of 3, in rounds: a burst of other load on a shared VM hits one round
            for name, measure in measures.items():  # of every measure, not all 3 runs of one of them
                n, seconds = measure()
                runs[name].append(n / seconds)
        rates = {name: median(values) for name, values in runs.items()}
        rates["c"] = rates["c1"] * cores
        pieces = {"hot loop (c)": 1e6 / rates["c1"], **piece_costs(spec, aug, min(512, spec.train_samples))}
        pieces.update({f"{k} in (d)": median([c[k] for c in cpu]) for k in ("loaders", "consumer")})
        memory = memory_rows(Path(tmp), samples, cores, echo)

    echo("CPU us per sample: " + ", ".join(f"{k} {v:.0f}" for k, v in pieces.items()))
    echo(
        f"b/a = {rates['b'] / rates['a']:.2f} (goal >= 0.5)   "
        f"d/c = {rates['d'] / rates['c']:.2f} (goal >= 0.8)   "
        f"peak RSS 10x/1x data: loader {memory[0]['ratio']:.3f}, consumer {memory[1]['ratio']:.3f} "
        "(goal <= 1.05)"
    )
    return [
        row("(a) raw tar read", rates["a"], "samples/s"),
        row("(b) stream, no decode", rates["b"], "samples/s", rates["a"]),
        row(f"(c) {cores} cores x 1-core decode+augment", rates["c"], "samples/s"),
        row(f"(d) stream, decode+augment, {cores} loader procs", rates["d"], "samples/s", rates["c"]),
        row("loader b/a", rates["b"], "samples/s", rates["a"]),
        row("loader d/c", rates["d"], "samples/s", rates["c"]),
        *memory,
    ]
