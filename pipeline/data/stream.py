"""Stream WebDataset shards to batches: the only webdataset import.

Which reader reads which sample, in which order, is planned in `cursor.py`; this module does the I/O:
open a shard (local, brace-expanded, `pipe:`, or any fsspec URL such as `s3://`), expand the tar into
samples with webdataset, emit a window's samples in the planned order, decode, and apply the
corrupt-data policy. Training batches carry the position of their last sample, so the main process
always knows the cursor of what it has *consumed* (DataLoader processes read ahead of that).

Samples are written, cropped and flipped, straight into their batch; a large batch leaves its loader
process in a shared-memory buffer that the process fills again once the consumer has dropped the batch
(`SharedBuffers`), a small one in-band.

DataLoader round robin: with W loader processes, batch k of a rank comes from process k % W. After a
resume, process j plays local reader (j + rotation) % W, so batches arrive in the unbroken order.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import DataConfig
from pipeline.data import cursor as cur
from pipeline.data.cache import DecodedCache, decoded_bytes
from pipeline.data.decode import Decoder, decoded_shape
from pipeline.data.shards import DataError, DataSpec
from pipeline.data.transforms import crop_image, image_shape, place, to_tensor


def readers_needed(world_size: int, loader_workers: int) -> int:
    return world_size * max(1, loader_workers)


def check_shard_count(spec: DataSpec, world_size: int, loader_workers: int) -> None:
    """Fewer train shards than readers would leave a reader with nothing: fail at start, clearly."""
    needed = readers_needed(world_size, loader_workers)
    if len(spec.train_urls) < needed:
        hint = (
            f" (e.g. --samples-per-shard {max(1, spec.train_samples // needed)})"
            if spec.train_samples
            else ""
        )
        how = (
            "write your shards smaller (e.g. a smaller ShardWriter maxcount) and re-run `pipeline data index`"
            if spec.indexed
            else "re-run `pipeline data prepare` with smaller shards"
        )
        raise DataError(
            f"data.train has {len(spec.train_urls)} shard(s) but {world_size} worker(s) x "
            f"{max(1, loader_workers)} loader process(es) need at least {needed}: {how}{hint}, or lower "
            "cluster.num_workers / data.num_workers"
        )


def open_shard(url: str, storage_options: dict[str, Any]) -> Any:
    """A readable binary stream: fsspec for object stores (webdataset has no s3), gopen otherwise."""
    if "://" in url and not url.startswith(("file://", "http://", "https://")):
        import fsspec  # s3fs/gcsfs plug in here

        return fsspec.open(url, "rb", **storage_options).open()
    return wds.gopen(url.removeprefix("file://"), "rb")


def iter_samples(fileobj: Any, url: str) -> Iterator[dict]:
    """The samples of an open tar stream, lazily, grouped exactly as training reads them; raises on
    a broken tar (`read_shard` applies the corrupt-data policy instead)."""
    files = wds.tariterators.tar_file_expander([{"url": url, "stream": fileobj}])
    return wds.tariterators.group_by_keys(files)


def first_samples(url: str, storage_options: dict[str, Any], count: int) -> list[dict]:
    """The first `count` samples of a shard, reading no further than needed."""
    stream = open_shard(url, storage_options)
    samples: list[dict] = []
    try:
        for sample in iter_samples(stream, url):
            samples.append(sample)
            if len(samples) >= count:
                break
    finally:
        # a `pipe:` command cut short may report its broken pipe: not a problem of the data
        with contextlib.suppress(Exception):
            stream.close()
    return samples


@dataclass
class Bad:
    """A sample that could not be used, with where it was and why."""

    shard: str
    key: str
    reason: str


def read_shard(url: str, storage_options: dict[str, Any], strict: bool) -> tuple[list[dict], str | None]:
    """All samples of one shard in tar order, and the error that cut it short (None if it read fully).
    In strict mode the error is raised instead, naming the shard."""
    problem: list[str] = []

    def handler(exn: Exception) -> bool:
        if strict:
            raise DataError(f"shard {url}: {exn}") from exn
        problem.append(str(exn))
        return False  # stop this shard: what follows a broken member cannot be trusted

    try:
        stream = open_shard(url, storage_options)
    except (OSError, ValueError) as e:
        if strict:
            raise DataError(f"shard {url} cannot be opened: {e}") from e
        return [], f"cannot open: {e}"
    try:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        samples = list(wds.tariterators.group_by_keys(files, handler=handler))
    finally:
        stream.close()
    return samples, (problem[0] if problem else None)


@dataclass
class Emitted:
    position: tuple[int, int, int]  # (epoch, window, offset) of this sample
    sample: dict | None  # None: could not be read (bad), see `bad`
    bad: Bad | None = None


def load_window(
    urls: list[str],
    window: list[int],
    storage_options: dict[str, Any],
    strict: bool,
    cache: DecodedCache | None,
) -> tuple[dict[tuple[int, int], dict], dict[int, str]]:
    """The samples of a window's shards by (shard, index), and the error of each shard cut short.
    The dict is all that holds a sample (besides the cache): `reader_samples` pops each as it emits it,
    so its decoded value lives only until it is in a batch. (A list of the window's samples kept
    alongside held every decoded image of the window: ~150 MB per loader process at 256x256 RGB.)"""
    loaded: dict[tuple[int, int], dict] = {}
    broken: dict[int, str] = {}
    for shard in window:
        url = urls[shard]
        samples, problem = (
            cache.read(shard, lambda url=url: read_shard(url, storage_options, strict))
            if cache is not None
            else read_shard(url, storage_options, strict)
        )
        loaded.update(((shard, i), s) for i, s in enumerate(samples))
        if problem is not None:
            broken[shard] = problem
    return loaded, broken


def reader_samples(
    urls: list[str],
    layout: cur.Layout,
    cursor: cur.Cursor,
    reader: int,
    storage_options: dict[str, Any],
    strict: bool,
    infinite: bool,
    cache: DecodedCache | None = None,
) -> Iterator[Emitted]:
    """Reader `reader`'s samples from its cursor position on, epoch after epoch (one epoch if finite);
    shards come from `cache` where it holds them."""
    start = cursor.readers[reader]
    epoch = start.epoch
    while True:
        base = cursor.base(epoch)
        groups = cur.windows(layout, cur.reader_shards(layout, epoch, base, cursor.num_readers, reader))
        first_window = start.window if epoch == start.epoch else 0
        for window_no in range(first_window, len(groups)):
            window = groups[window_no]
            refs = cur.window_refs(layout, window, base)
            order = cur.permutation(layout, len(refs), epoch, cursor.num_readers, reader, window_no)
            offset = start.offset if (epoch, window_no) == (start.epoch, start.window) else 0
            if offset >= len(refs):
                continue
            loaded, broken = load_window(urls, window, storage_options, strict, cache)
            for pos in range(offset, len(refs)):
                shard, index = refs[order[pos]]
                sample = loaded.pop((shard, index), None)
                position = (epoch, window_no, pos)
                if sample is None:
                    why = broken.get(
                        shard, "sample missing from shard (fewer samples than the MANIFEST says)"
                    )
                    if strict:
                        raise DataError(f"shard {urls[shard]}: sample #{index}: {why}")
                    yield Emitted(position, None, Bad(urls[shard], f"#{index}", why))
                else:
                    yield Emitted(position, sample)
        if not infinite:
            return
        epoch += 1


FIRST_SAMPLES = 8  # in skip mode, samples tried before the data is judged unreadable


def check_first_sample(spec: DataSpec, cfg: DataConfig) -> None:
    """Decode the first sample of the first train shard before anything starts, as the run will:
    a wrong field, a missing key or a failing data.decode function is a DataError (exit 2) naming the
    shard, the expected key and the keys the sample has. With data.on_error=skip, the first sample
    that decodes among the first few (of the first readable shards) is enough."""
    if spec.decode and not cfg.decode:
        raise DataError(
            f"data.train was indexed with the decode function {spec.decode} (its MANIFEST says so): set "
            f"data.decode={spec.decode} (a MANIFEST never imports code by itself)"
        )
    if cfg.fields.target and spec.label_type is None and not cfg.decode:
        raise DataError(
            f"config key 'data.fields.target': the MANIFEST of data.train records no labels; re-run "
            f"`pipeline data index` with --target {cfg.fields.target}"
        )
    decoder = Decoder(spec, None, 0, cfg.fields, cfg.decode)
    if cfg.decode:
        decoder.function()  # a wrong import path: ConfigError naming data.decode
    strict = cfg.on_error == "strict"
    errors: list[str] = []
    for url in spec.train_urls:
        try:
            samples = first_samples(url, cfg.storage_options, 1 if strict else FIRST_SAMPLES)
        except Exception as e:  # OSError, tarfile.TarError, webdataset's ValueErrors ...
            if strict:
                raise DataError(f"data.train: shard {url} cannot be read: {e}") from None
            errors.append(f"shard {url} cannot be read: {e}")
            continue
        for sample in samples:
            try:
                value, _ = decoder.decode(sample)
            except ValueError as e:
                if strict:
                    raise DataError(f"data.train: the first sample cannot be used: {e}") from None
                errors.append(str(e))
                continue
            shape = decoded_shape(value, spec.kind)
            if spec.sample_shape is not None and shape != list(spec.sample_shape):
                raise DataError(
                    f"data.train: sample '{sample['__key__']}' in shard {url} decodes to shape {shape}, "
                    f"but the MANIFEST says {list(spec.sample_shape)}: re-run `pipeline data index` with "
                    "the run's data.fields / data.decode (--input/--target/--decode)"
                )
            return
        if len(errors) >= FIRST_SAMPLES:
            break
    first = errors[0] if errors else "?"
    raise DataError(f"data.train: none of the first samples can be used; first: {first}")


class ShardStream(IterableDataset):
    """One rank's readers (one per DataLoader process). Yields dicts: x, crop, y, key, meta, bad; x is
    the decoded value and crop its augmentation (None: none), applied by `collate` into the batch."""

    def __init__(
        self,
        urls: list[str],
        layout: cur.Layout,
        cursor: cur.Cursor,
        rank: int,
        decoder: Decoder,
        *,
        on_error: str,
        storage_options: dict[str, Any] | None = None,
        infinite: bool = True,
        cache_bytes: int = 0,
    ) -> None:
        self.urls, self.layout, self.cursor, self.rank, self.decoder = urls, layout, cursor, rank, decoder
        self.cache_bytes = cache_bytes  # per loader process (each builds its own in __iter__)
        self.strict = on_error == "strict"
        self.storage_options = storage_options or {}
        self.infinite = infinite

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        assert num_workers == self.cursor.loader_workers, "DataLoader processes != cursor readers per rank"
        local = (worker + self.cursor.rotation[self.rank]) % num_workers
        reader = cur.rank_readers(self.rank, num_workers)[local]
        pending_bad: list[Bad] = []
        epoch, good_in_epoch = self.cursor.readers[reader].epoch, 0
        spec = self.decoder.spec
        cache = (
            DecodedCache(self.cache_bytes, decoded_bytes(spec.sample_shape, spec.kind))
            if self.cache_bytes > 0
            else None
        )
        for item in reader_samples(
            self.urls,
            self.layout,
            self.cursor,
            reader,
            self.storage_options,
            self.strict,
            self.infinite,
            cache,
        ):
            if item.position[0] != epoch:
                if good_in_epoch == 0 and pending_bad:
                    # Every sample of a whole epoch was bad: skipping on would spin forever, never yielding.
                    raise DataError(
                        f"no readable sample in epoch {epoch} of reader {reader}; last: {pending_bad[-1]}"
                    )
                epoch, good_in_epoch = item.position[0], 0
            if item.sample is not None:
                try:
                    x, y, crop = self.decoder.prepare(item.sample, epoch)
                except ValueError as e:
                    if self.strict:
                        raise DataError(str(e)) from e
                    item.bad = Bad(item.sample.get("__url__", "?"), item.sample.get("__key__", "?"), str(e))
                else:
                    good_in_epoch += 1
                    meta = (reader, *item.position)
                    key = item.sample["__key__"]
                    yield {"x": x, "crop": crop, "y": y, "key": key, "meta": meta, "bad": pending_bad}
                    pending_bad = []
                    continue
            pending_bad.append(item.bad)
        if pending_bad:  # finite stream ending on bad samples: report them with an empty marker
            meta = (reader, -1, -1, -1)
            yield {"x": None, "crop": None, "y": None, "key": None, "meta": meta, "bad": pending_bad}


# Batches up to this size leave a loader process in-band, as numpy arrays pickled through the queue's
# pipe. Torch would send tensors as shared-memory file descriptors, and receiving each one costs a
# socket connection and an authentication handshake with the sender's resource-sharer thread: about
# 0.6 ms per tensor on an idle core, more when the sender's core is busy (measured per 50 KB MNIST
# batch: 2.1 -> 0.7 ms, consumer idle; 3.2 -> 1.1 ms, consumer busy). A large batch costs more to
# copy through the pipe than to hand over.
INBAND_MAX_BYTES = 1 << 20


@dataclass
class Batch:
    x: torch.Tensor  # a numpy array in transit from a loader process (see `tensors`)
    y: torch.Tensor
    keys: list[str]
    meta: tuple[int, int, int, int]  # (reader, epoch, window, offset) of the last sample
    bad: list[Bad] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)  # epoch of each sample
    # In a loader process: the shared buffer x was written into (see `SharedBuffers`), else None.
    buffer: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def tensors(self) -> Batch:
        """x and y as tensors again after an in-band transfer (no copy)."""
        if isinstance(self.x, np.ndarray):
            self.x = torch.from_numpy(self.x)
        if isinstance(self.y, np.ndarray):
            self.y = torch.from_numpy(self.y)
        return self

    def pin_memory(self) -> Batch:
        """Called by DataLoader's pin-memory thread (CUDA): page-locked, so the copy to the GPU is async."""
        self.tensors()
        self.x, self.y = self.x.pin_memory(), self.y.pin_memory()
        return self

    def __reduce__(self) -> tuple[Any, tuple]:
        """Pickled (into the DataLoader's queue): a batch in a shared buffer travels as that buffer (a
        file descriptor, no copy), and the receiving side hands it back when done (`_received`)."""
        fields = (self.y, self.keys, self.meta, self.bad, self.epochs)
        if self.buffer is None:
            return (Batch, (self.x, *fields))
        return (_received, (self.buffer, tuple(self.x.shape), self.x.dtype, *fields))


# Bytes before a shared buffer's samples: byte 0 says whether the batch in it is still in use; 64 keep
# the samples aligned for any dtype.
HEADER_BYTES = 64
SPARE_BUFFERS = 2  # free shared buffers a loader process keeps beyond the one it fills


class SharedBuffers:
    """A loader process's shared-memory batch buffers, reused once the consumer is done with a batch.

    Samples are written straight into shared memory: collating them into a private batch and copying
    that into fresh shared memory for the hand-over cost two more copies of every batch and page faults
    on new memory for each (~1/4 of a loader process's time at 256x256 RGB, 2-core VM). A buffer is in
    use from `take` until the consumer's last reference to the batch's x is gone (`_release`), so a
    batch the consumer keeps is never overwritten: the pool grows instead, and keeps few spares."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.buffers: list[torch.Tensor] = []  # flat uint8, HEADER_BYTES + batch bytes, shared

    def take(self, nbytes: int) -> torch.Tensor:
        """A free buffer of HEADER_BYTES + at least `nbytes`, marked in use."""
        if self.pid != os.getpid():  # inherited through fork: those buffers belong to the parent
            self.pid, self.buffers = os.getpid(), []
        free = [b for b in self.buffers if b[0] == 0]
        fits = [b for b in free if b.numel() >= HEADER_BYTES + nbytes]
        buffer = fits[0] if fits else torch.zeros(HEADER_BYTES + nbytes, dtype=torch.uint8).share_memory_()
        spares = [b for b in free if b is not buffer][SPARE_BUFFERS:]
        self.buffers = [b for b in self.buffers if b is not buffer and not any(b is s for s in spares)]
        self.buffers.append(buffer)
        buffer[0] = 1
        return buffer


SHARED_BUFFERS = SharedBuffers()  # this process's (each loader process gets its own: see `take`)


def _received(buffer: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, *fields: Any) -> Batch:
    """A shared-buffer batch, unpickled by the consumer: x is a view of the buffer, and once the last
    view of it dies the buffer is marked free for its loader process to fill again."""
    nbytes = math.prod(shape) * dtype.itemsize
    view = buffer[HEADER_BYTES : HEADER_BYTES + nbytes].view(dtype).view(shape).numpy()
    # torch.from_numpy holds `view` for as long as any tensor shares its memory: `view` dies with the
    # last of them, never earlier (a finalizer on the tensor object would fire while a view lives on).
    weakref.finalize(view, _release, buffer.numpy()[:1]).atexit = False
    return Batch(torch.from_numpy(view), *fields)


def _release(flag: np.ndarray) -> None:
    flag[0] = 0  # written after the consumer's last read of the batch: its loader may now refill it


def batch_tensor(
    count: int, shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x to write `count` samples into, the shared buffer it lives in or None). In a loader process a
    large batch goes to a shared buffer, a small one to private memory (it travels in-band)."""
    nbytes = count * math.prod(shape) * dtype.itemsize
    if get_worker_info() is None or nbytes <= INBAND_MAX_BYTES:
        return torch.empty((count, *shape), dtype=dtype), None
    buffer = SHARED_BUFFERS.take(nbytes)
    return buffer[HEADER_BYTES : HEADER_BYTES + nbytes].view(dtype).view(count, *shape), buffer


def slot_shape(x: np.ndarray | torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of one sample in a batch: decoded images (numpy) are uint8 (H, W, C)."""
    if isinstance(x, np.ndarray):
        return image_shape(x), torch.from_numpy(x[:0]).dtype
    return tuple(x.shape), x.dtype


def collate(samples: list[dict]) -> Batch:
    good = [s for s in samples if s["x"] is not None]
    bad = [b for s in samples for b in s["bad"]]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), [], samples[-1]["meta"], bad, [])
    if len({(type(s["x"]), s["x"].shape, s["x"].dtype) for s in good}) == 1:
        shape, dtype = slot_shape(good[0]["x"])
        x, buffer = batch_tensor(len(good), shape, dtype)
        for slot, s in zip(x, good, strict=True):
            place(s["x"], s.get("crop"), slot)  # decoded -> batch: the only copy of the pixels
    else:  # samples that do not stack: torch.stack's error (or type promotion), as always
        x, buffer = torch.stack([_as_tensor(s) for s in good]), None
    batch = Batch(
        x=x,
        y=torch.tensor([s["y"] for s in good], dtype=torch.long),
        keys=[s["key"] for s in good],
        meta=good[-1]["meta"],
        bad=bad,
        epochs=[s["meta"][1] for s in good],
        buffer=buffer,
    )
    if get_worker_info() is not None and buffer is None and batch.x.nbytes <= INBAND_MAX_BYTES:
        batch.x, batch.y = batch.x.numpy(), batch.y.numpy()
    elif buffer is not None:
        batch.y = batch.y.numpy()  # in-band: only x has a buffer to travel in
    return batch


def _as_tensor(sample: dict) -> torch.Tensor:
    x, crop = sample["x"], sample.get("crop")
    if crop is not None:
        return crop_image(x, crop)
    return to_tensor(x) if isinstance(x, np.ndarray) else x


def layout_for(spec: DataSpec, cfg: DataConfig, seed: int, split: str = "train") -> cur.Layout:
    counts = spec.train_counts if split == "train" else spec.val_counts
    if split == "train":
        return cur.Layout(tuple(counts), seed, cfg.shuffle_buffer > 0, cfg.shuffle_buffer)
    return cur.Layout(tuple(counts), 0, False, 0)


def shards_per_rank(spec: DataSpec, cfg: DataConfig, world_size: int, seed: int) -> list[int]:
    """Train shards each rank's readers read in a fresh run's first epoch (`--dry-run`); the same
    split `TrainBatches` streams, shards dealt to readers (rank x loader process), not to ranks."""
    layout = layout_for(spec, cfg, seed)
    return [
        len(cur.rank_shards(layout, 0, None, world_size, cfg.num_workers, rank)) for rank in range(world_size)
    ]


class TrainBatches:
    """A rank's training batches, with the cursor of what this rank has consumed (`local_state`)."""

    def __init__(
        self,
        spec: DataSpec,
        cfg: DataConfig,
        rank: int,
        world_size: int,
        seed: int,
        cursor: cur.Cursor | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.layout = layout_for(spec, cfg, seed)
        if cursor is None:
            cursor = cur.Cursor.fresh(world_size, cfg.num_workers)
        # Resuming with another world size or loader count: recompute what is left of the open epochs.
        self.cursor = cur.remap(self.layout, cursor, world_size, cfg.num_workers)
        self.rank, self.world_size = rank, world_size
        self.workers = self.cursor.loader_workers
        stream = ShardStream(
            spec.train_urls,
            self.layout,
            self.cursor,
            rank,
            Decoder(spec, cfg.augment, seed, cfg.fields, cfg.decode),
            on_error=cfg.on_error,
            storage_options=cfg.storage_options,
            cache_bytes=int(cfg.cache_mb * 2**20),
        )
        self.loader = DataLoader(
            stream,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            collate_fn=collate,
            persistent_workers=cfg.num_workers > 0,
            pin_memory=pin_memory,
        )
        self._iter = iter(self.loader)
        self.positions = {g: self.cursor.readers[g] for g in cur.rank_readers(rank, self.workers)}
        self.rotation = self.cursor.rotation[rank]
        self.wait_s = 0.0  # time spent waiting for batches (input stall)

    def __next__(self) -> Batch:
        start = time.perf_counter()
        batch = next(self._iter).tensors()
        self.wait_s += time.perf_counter() - start
        reader, epoch, window, offset = batch.meta
        self.positions[reader] = cur.Position(epoch, window, offset + 1)
        self.rotation = (self.rotation + 1) % self.workers
        return batch

    def local_state(self) -> dict[str, Any]:
        """This rank's part of the cursor (JSON-able), to be gathered and merged at checkpoints."""
        return {
            "loader_workers": self.workers,
            "readers": [list(self.positions[g].as_tuple()) for g in sorted(self.positions)],
            "rotation": self.rotation,
            "bases": {str(e): b.to_dict() for e, b in self.cursor.bases.items()},
        }

    @property
    def epoch(self) -> int:
        return min(p.epoch for p in self.positions.values())

    def assignment(self) -> tuple[int, int]:
        """(shards, samples) this rank's readers cover in the current epoch (the start summary)."""
        epoch = self.epoch
        shards = cur.rank_shards(
            self.layout, epoch, self.cursor.base(epoch), self.world_size, self.workers, self.rank
        )
        return len(shards), sum(self.layout.counts[s] for s in shards)

    def close(self) -> None:
        """Stop the DataLoader processes now (they would otherwise live until garbage collection)."""
        shutdown = getattr(self._iter, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def eval_batches(spec: DataSpec, cfg: DataConfig, rank: int, world_size: int) -> Iterator[Batch]:
    """One deterministic pass over this rank's val shards (no shuffle); a rank may get none."""
    workers = min(cfg.num_workers, 1)
    layout = layout_for(spec, cfg, 0, split="val")
    cursor = cur.Cursor.fresh(world_size, workers)
    stream = ShardStream(
        spec.val_urls,
        layout,
        cursor,
        rank,
        Decoder(spec, None, 0, cfg.fields, cfg.decode),
        on_error=cfg.on_error,
        storage_options=cfg.storage_options,
        infinite=False,
    )
    for batch in DataLoader(stream, batch_size=cfg.batch_size, num_workers=workers, collate_fn=collate):
        if len(batch.keys):
            yield batch.tensors()
