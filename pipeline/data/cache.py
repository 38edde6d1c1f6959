"""`data.cache_mb`: keep the decoded training samples of the shards a loader process has read in its
memory, so that later epochs neither read nor decode them again.

On a small dataset the loader's CPU time is mostly tar parsing (~65 us a sample with webdataset's
Python tar reader) and image decoding (~50 us for a 28x28 PNG); on a few cores that CPU is taken from
the trainers. A shard served from the cache costs neither; order, augmentation and the data cursor
are untouched (augmentation runs after the cache, seeded per epoch and sample as before), so a run
with the cache sees bitwise the same batches as one without.

Written here rather than taken from a library: torchdata's in-memory cache holds whole datapipe
outputs (after augmentation, so every epoch would see the first epoch's crops) and has no byte budget.

Each loader process has its own cache (loader processes share nothing), and over the epochs a process
reads different shards, so one process may come to hold the whole train split: the budget is per
process. A shard is admitted whole or not at all, while the running total stays under the budget;
a shard that did not read fully (a broken tar) is never cached, so its error is met again every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

DECODED = "__decoded__"  # sample key of the decoded (value, label), or the decode error's text


class DecodedCache:
    """Shard index -> its samples; each sample dict gets its decoded value in place on first use
    (`Decoder.__call__` stores it) and then drops its encoded bytes."""

    def __init__(self, budget_bytes: int, decoded_bytes_per_sample: int) -> None:
        self.budget_bytes = budget_bytes
        self.decoded_bytes_per_sample = decoded_bytes_per_sample
        self.used_bytes = 0
        self.shards: dict[int, list[dict]] = {}
        self.hits = self.misses = 0

    def read(
        self, shard: int, read: Callable[[], tuple[list[dict], str | None]]
    ) -> tuple[list[dict], str | None]:
        """A shard's samples from memory, or from `read()` (then kept if it read fully and fits)."""
        cached = self.shards.get(shard)
        if cached is not None:
            self.hits += 1
            return cached, None
        self.misses += 1
        samples, problem = read()
        # Charged up front at the larger of the encoded and decoded sizes: the samples hold their
        # encoded bytes until each is first decoded, the decoded array after.
        cost = sum(max(_encoded_bytes(s), self.decoded_bytes_per_sample) for s in samples)
        if problem is None and self.used_bytes + cost <= self.budget_bytes:
            self.shards[shard] = samples
            self.used_bytes += cost
        return samples, problem


def _encoded_bytes(sample: dict[str, Any]) -> int:
    return sum(len(v) for k, v in sample.items() if isinstance(v, bytes) and not k.startswith("__"))


def decoded_bytes(sample_shape: list[int], kind: str) -> int:
    """Bytes of one decoded sample: uint8 pixels for images, int64 tokens, float32 values for sequences."""
    return math.prod(sample_shape) * {"image": 1, "tokens": 8}.get(kind, 4)
