"""Stream WebDataset shards to (image, label) tensors: the only webdataset import.

Split: shard order is shuffled from (seed, epoch); training worker `rank` of `world_size` takes every
world_size-th shard, and DataLoader process `w` of `n` takes every n-th of those. We split by the ranks
we are given instead of `wds.split_by_node`, which reads them from the environment implicitly.

The training stream is infinite (epoch after epoch), so ranks never run dry at different steps and no
collective hangs; the number of steps is the loop's business. The eval stream is one pass.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import DataConfig
from pipeline.data.shards import DataError, DataSpec
from pipeline.data.transforms import decode_image, decode_label, to_tensor


def readers_needed(world_size: int, loader_workers: int) -> int:
    return world_size * max(1, loader_workers)


def check_shard_count(spec: DataSpec, world_size: int, loader_workers: int) -> None:
    """Fewer train shards than readers would leave a reader with nothing: fail at start, clearly."""
    needed = readers_needed(world_size, loader_workers)
    if len(spec.train_urls) < needed:
        per_shard = ""
        if spec.train_samples:
            per_shard = f" (e.g. --samples-per-shard {max(1, spec.train_samples // needed)})"
        raise DataError(
            f"data.train has {len(spec.train_urls)} shard(s) but {world_size} worker(s) x "
            f"{max(1, loader_workers)} loader process(es) need at least {needed}: re-run "
            f"`pipeline data prepare` with smaller shards{per_shard}, or lower cluster.num_workers / "
            "data.num_workers"
        )


@dataclass(frozen=True)
class StreamPosition:
    rank: int
    world_size: int
    seed: int


def shard_order(urls: list[str], seed: int, epoch: int, shuffle: bool) -> list[str]:
    if not shuffle:
        return list(urls)
    order = list(urls)
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order


class ShardStream(IterableDataset):
    """Yields (x: float32 (C,H,W), y: int64[, key]) for this rank and DataLoader process."""

    def __init__(
        self,
        urls: list[str],
        spec: DataSpec,
        position: StreamPosition,
        *,
        shuffle_buffer: int,
        infinite: bool,
        on_error: str,
        with_keys: bool = False,
    ) -> None:
        self.urls = urls
        self.spec = spec
        self.position = position
        self.shuffle_buffer = shuffle_buffer
        self.infinite = infinite
        self.on_error = on_error
        self.with_keys = with_keys  # also yield each sample's key (for the ledger and audits)

    def _decode(self, sample: dict) -> tuple:
        key = sample.get("__key__")
        url = sample.get("__url__")
        image = next((sample[k] for k in ("png", "jpg", "jpeg", "webp") if k in sample), None)
        if image is None or "cls" not in sample:
            missing = "image" if image is None else "label (.cls)"
            raise ValueError(f"sample '{key}' in shard {url} has no {missing}")
        try:
            x = to_tensor(decode_image(image), self.spec.mean, self.spec.std)
            y = decode_label(sample["cls"])
        except ValueError as e:
            raise ValueError(f"sample '{key}' in shard {url}: {e}") from e
        return (x, y, key) if self.with_keys else (x, y)

    def _handler(self, exn: Exception) -> bool:
        # strict: re-raise with the shard named (webdataset appends the url to exn.args).
        if self.on_error == "strict":
            raise DataError(f"reading shards failed: {exn}") from exn
        return True  # skip: accounting of skipped samples comes with the corrupt-data policy

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        rank, world = self.position.rank, self.position.world_size
        shuffle = self.shuffle_buffer > 0
        epoch = 0
        while True:
            mine = shard_order(self.urls, self.position.seed, epoch, shuffle)[rank::world][
                worker::num_workers
            ]
            samples = wds.tarfile_to_samples(handler=self._handler)(iter([{"url": u} for u in mine]))
            if shuffle:
                rng = random.Random(f"samples/{self.position.seed}/{epoch}/{rank}/{worker}")
                samples = wds.filters.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(
                    samples
                )
            for sample in samples:
                try:
                    yield self._decode(sample)
                except ValueError as e:
                    if self.on_error == "strict":
                        raise DataError(str(e)) from e
            if not self.infinite:
                return
            epoch += 1


def train_loader(
    spec: DataSpec, cfg: DataConfig, rank: int, world_size: int, seed: int, pin_memory: bool = False
) -> DataLoader:
    stream = ShardStream(
        spec.train_urls,
        spec,
        StreamPosition(rank, world_size, seed),
        shuffle_buffer=cfg.shuffle_buffer,
        infinite=True,
        on_error=cfg.on_error,
    )
    return DataLoader(
        stream,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=pin_memory,
    )


def eval_loader(spec: DataSpec, cfg: DataConfig, rank: int, world_size: int) -> DataLoader:
    """One deterministic pass over this rank's val shards (no shuffle). A rank may get none."""
    stream = ShardStream(
        spec.val_urls,
        spec,
        StreamPosition(rank, world_size, seed=0),
        shuffle_buffer=0,
        infinite=False,
        on_error=cfg.on_error,
    )
    return DataLoader(stream, batch_size=cfg.batch_size, num_workers=min(cfg.num_workers, 1))
