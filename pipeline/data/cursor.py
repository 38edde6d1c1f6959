"""The data cursor: where every reader of the training stream is, and how that maps to samples.

Pure bookkeeping (no I/O): everything here follows from the shard list, the declared sample count
of each shard (MANIFEST), the seed and the topology, so a resumed run can recompute any epoch plan.

Plan of epoch `e` for R readers (reader g = rank * W + loader process, W = max(1, data.num_workers)):
  1. shard order: the shard indices shuffled from (seed, e);
  2. shards already consumed in `e` before the current topology took over (the epoch's *base*, set by an
     elastic remap) are dropped; reader g takes every R-th remaining shard, starting at g;
  3. its shards are cut into *windows*: consecutive shards holding >= `buffer` samples together;
  4. the samples of a window (minus the base's partially consumed ones) are permuted from
     (seed, e, R, g, window) and emitted in that order.
A reader's position is (epoch, window, offset): the next position in the window's permutation. Bad
samples occupy positions too, so a position always names the same sample.

Exact resume: same topology, every reader continues at its position (the window is re-read, nothing
before it). Elastic resume (other R): the samples consumed so far in each open epoch are computed from
the positions and become those epochs' bases; all new readers restart at the oldest open epoch and
read only what is left, so every remaining sample is seen exactly once (in another order).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Layout:
    """What fixes the epoch plans of a dataset."""

    counts: tuple[int, ...]  # declared samples per shard, in canonical (MANIFEST) order
    seed: int
    shuffle: bool
    buffer: int  # samples per shuffle window (0: no shuffling, one shard per window)

    @property
    def num_shards(self) -> int:
        return len(self.counts)


@dataclass
class Base:
    """Samples of one epoch consumed before the current topology: whole shards and single samples."""

    full: set[int] = field(default_factory=set)
    partial: dict[int, set[int]] = field(default_factory=dict)

    def excludes(self, shard: int, index: int) -> bool:
        return shard in self.full or index in self.partial.get(shard, ())

    def add(self, shard: int, indices: set[int], count: int) -> None:
        if shard in self.full:
            return
        merged = self.partial.get(shard, set()) | indices
        if len(merged) >= count:
            self.full.add(shard)
            self.partial.pop(shard, None)
        elif merged:
            self.partial[shard] = merged

    def to_dict(self) -> dict[str, Any]:
        return {"full": sorted(self.full), "partial": {str(s): sorted(i) for s, i in self.partial.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Base:
        return cls(set(d["full"]), {int(s): set(i) for s, i in d["partial"].items()})


@dataclass
class Position:
    epoch: int = 0
    window: int = 0
    offset: int = 0

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.epoch, self.window, self.offset)


def shard_order(layout: Layout, epoch: int) -> list[int]:
    order = list(range(layout.num_shards))
    if layout.shuffle:
        random.Random(f"shards/{layout.seed}/{epoch}").shuffle(order)
    return order


def reader_shards(layout: Layout, epoch: int, base: Base | None, num_readers: int, reader: int) -> list[int]:
    """The shards reader `reader` of `num_readers` reads in `epoch` (in its reading order)."""
    remaining = [s for s in shard_order(layout, epoch) if base is None or s not in base.full]
    return remaining[reader::num_readers]


def rank_readers(rank: int, loader_workers: int) -> range:
    """The readers of one rank: one per DataLoader process, g = rank * W + loader process."""
    workers = max(1, loader_workers)
    return range(rank * workers, (rank + 1) * workers)


def rank_shards(
    layout: Layout, epoch: int, base: Base | None, world_size: int, loader_workers: int, rank: int
) -> list[int]:
    """The shards all readers of `rank` read in `epoch` together: the split by reader, not by rank (with
    12 shards, 2 ranks x 4 loader processes, rank 0's readers 0-3 read 8 shards and rank 1's 4)."""
    num_readers = world_size * max(1, loader_workers)
    return [
        s
        for g in rank_readers(rank, loader_workers)
        for s in reader_shards(layout, epoch, base, num_readers, g)
    ]


def windows(layout: Layout, shards: list[int]) -> list[list[int]]:
    """Consecutive shards grouped until they hold >= layout.buffer samples (one shard each if 0)."""
    out: list[list[int]] = []
    current: list[int] = []
    held = 0
    for shard in shards:
        current.append(shard)
        held += layout.counts[shard]
        if held >= layout.buffer:
            out.append(current)
            current, held = [], 0
    if current:
        out.append(current)
    return out


def window_refs(layout: Layout, window: list[int], base: Base | None) -> list[tuple[int, int]]:
    return [
        (shard, index)
        for shard in window
        for index in range(layout.counts[shard])
        if base is None or not base.excludes(shard, index)
    ]


def permutation(layout: Layout, n: int, epoch: int, num_readers: int, reader: int, window: int) -> list[int]:
    order = list(range(n))
    if layout.shuffle:
        random.Random(f"samples/{layout.seed}/{epoch}/{num_readers}/{reader}/{window}").shuffle(order)
    return order


@dataclass
class Cursor:
    """Positions of all R readers, plus what each rank's DataLoader yields next (`rotation`)."""

    world_size: int
    loader_workers: int  # W: readers per rank
    readers: list[Position]
    rotation: list[int]  # per rank: the local reader whose batch comes next (DataLoader round robin)
    bases: dict[int, Base] = field(default_factory=dict)

    @classmethod
    def fresh(cls, world_size: int, loader_workers: int) -> Cursor:
        workers = max(1, loader_workers)
        return cls(world_size, workers, [Position() for _ in range(world_size * workers)], [0] * world_size)

    @property
    def num_readers(self) -> int:
        return self.world_size * self.loader_workers

    def base(self, epoch: int) -> Base | None:
        return self.bases.get(epoch)

    def to_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "loader_workers": self.loader_workers,
            "readers": [list(p.as_tuple()) for p in self.readers],
            "rotation": list(self.rotation),
            "bases": {str(e): b.to_dict() for e, b in self.bases.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cursor:
        return cls(
            world_size=d["world_size"],
            loader_workers=d["loader_workers"],
            readers=[Position(*p) for p in d["readers"]],
            rotation=list(d["rotation"]),
            bases={int(e): Base.from_dict(b) for e, b in d["bases"].items()},
        )


def consumed_in_epoch(layout: Layout, cursor: Cursor, epoch: int) -> Base:
    """Every sample of `epoch` consumed so far: the epoch's base plus what each reader has emitted."""
    old = cursor.base(epoch)
    consumed = Base(set(old.full), {s: set(i) for s, i in old.partial.items()}) if old else Base()
    for g, pos in enumerate(cursor.readers):
        if pos.epoch < epoch:
            continue
        shards = reader_shards(layout, epoch, old, cursor.num_readers, g)
        if pos.epoch > epoch:
            consumed.full.update(shards)
            continue
        groups = windows(layout, shards)
        for window in groups[: pos.window]:
            consumed.full.update(window)
        if pos.window < len(groups):
            refs = window_refs(layout, groups[pos.window], old)
            perm = permutation(layout, len(refs), epoch, cursor.num_readers, g, pos.window)
            taken: dict[int, set[int]] = {}
            for k in perm[: pos.offset]:
                shard, index = refs[k]
                taken.setdefault(shard, set()).add(index)
            for shard, indices in taken.items():
                consumed.add(shard, indices, layout.counts[shard])
    for shard in list(consumed.partial):  # normalise: a shard whose samples are all gone is full
        consumed.add(shard, set(), layout.counts[shard])
    return consumed


def remap(layout: Layout, cursor: Cursor, world_size: int, loader_workers: int) -> Cursor:
    """The cursor for another topology: same samples consumed, the rest of each open epoch still ahead."""
    workers = max(1, loader_workers)
    if world_size == cursor.world_size and workers == cursor.loader_workers:
        return cursor
    first = min(p.epoch for p in cursor.readers)
    last = max(p.epoch for p in cursor.readers)
    bases = {e: consumed_in_epoch(layout, cursor, e) for e in range(first, last + 1)}
    bases = {e: b for e, b in bases.items() if b.full or b.partial}
    readers = [Position(epoch=first) for _ in range(world_size * workers)]
    return Cursor(world_size, workers, readers, [0] * world_size, bases)


def merge_rank_states(states: list[dict[str, Any]]) -> Cursor:
    """Combine the per-rank states gathered at a checkpoint into one cursor (ranks in order)."""
    readers = [Position(*p) for state in states for p in state["readers"]]
    oldest_open = min(p.epoch for p in readers)
    return Cursor(
        world_size=len(states),
        loader_workers=states[0]["loader_workers"],
        readers=readers,
        rotation=[s["rotation"] for s in states],
        # an epoch every reader has finished needs its base no more
        bases={int(e): Base.from_dict(b) for e, b in states[0]["bases"].items() if int(e) >= oldest_open},
    )
