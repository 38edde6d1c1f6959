"""`data.cache_mb`: later epochs come from memory, with bitwise the same batches, a byte budget, and
bad samples reported again in every epoch. Also the in-band transfer of small batches."""

import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data import cache as cache_mod
from pipeline.data import shards, stream
from pipeline.data.cache import DecodedCache, decoded_bytes


def batches(spec, cfg, n, seed=7, rank=0, world=1):
    source = stream.TrainBatches(spec, cfg, rank, world, seed=seed)
    try:
        return [next(source) for _ in range(n)]
    finally:
        source.close()


def count_shard_reads(monkeypatch):
    reads = []
    real = stream.read_shard

    def counting(url, storage_options, strict):
        reads.append(url)
        return real(url, storage_options, strict)

    monkeypatch.setattr(stream, "read_shard", counting)
    return reads


@pytest.mark.parametrize("augment", [{}, {"crop_padding": 2, "hflip": True}])
def test_cached_epochs_are_bitwise_the_uncached_ones_and_skip_reading(digits_dir, monkeypatch, augment):
    spec = shards.resolve(str(digits_dir), None)
    plain = DataConfig(train="-", batch_size=48, shuffle_buffer=200, augment=augment)
    cached = plain.model_copy(update={"cache_mb": 16})
    n = 3 * spec.train_samples // 48  # three epochs on one rank
    expected = batches(spec, plain, n)
    reads = count_shard_reads(monkeypatch)
    got = batches(spec, cached, n)
    assert [b.keys for b in got] == [b.keys for b in expected]
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    # One rank, one reader: every shard once in epoch 0, then never again.
    assert sorted(reads) == sorted(spec.train_urls)


def test_the_budget_caps_what_is_kept(digits_dir, monkeypatch):
    spec = shards.resolve(str(digits_dir), None)
    per_sample = decoded_bytes(spec.sample_shape, spec.kind)
    per_shard = max(  # what the cache charges for the costliest shard
        sum(max(cache_mod._encoded_bytes(s), per_sample) for s in stream.read_shard(url, {}, True)[0])
        for url in spec.train_urls
    )
    budget_shards = 3
    cfg = DataConfig(train="-", batch_size=48, shuffle_buffer=0, cache_mb=budget_shards * per_shard / 2**20)
    reads = count_shard_reads(monkeypatch)
    batches(spec, cfg, 2 * spec.train_samples // 48)
    reread = len(reads) - len(spec.train_urls)
    # At least budget_shards shards stay cached (not read again in epoch 1); the others are re-read.
    assert 0 < reread <= len(spec.train_urls) - budget_shards

    cache = DecodedCache(budget_bytes=1000, decoded_bytes_per_sample=300)
    samples = [{"__key__": str(i), "png": b"x" * 100} for i in range(3)]
    assert cache.read(0, lambda: (samples, None)) == (samples, None) and cache.used_bytes == 900
    assert cache.read(1, lambda: (samples, None))[0] is samples and 1 not in cache.shards  # over budget
    assert cache.read(0, lambda: pytest.fail("read again")) == (samples, None) and cache.hits == 1
    cache.read(2, lambda: (samples[:1], "truncated"))
    assert 2 not in cache.shards  # a broken shard is read (and reported) every epoch


def test_bad_samples_are_reported_in_every_epoch(corrupt_digits):
    out, _, expected = corrupt_digits
    spec = shards.resolve(str(out), None, missing_ok=True)
    keys = (expected["garbage"][1], expected["unlabeled"][1])
    counts = {}
    for cache_mb in (0, 16):
        cfg = DataConfig(train="-", batch_size=60, shuffle_buffer=0, on_error="skip", cache_mb=cache_mb)
        seen = [b for batch in batches(spec, cfg, 2 * spec.train_samples // 60) for b in batch.bad]
        counts[cache_mb] = sorted(b.key for b in seen if b.key in keys)
        assert all("undecodable" in b.reason or "label" in b.reason for b in seen if b.key in keys)
    # once per epoch (the batches span more than two), the same with the cache as without
    assert counts[16] == counts[0] and all(counts[0].count(k) >= 2 for k in keys)


def test_small_batches_cross_processes_in_band_and_arrive_as_tensors(digits_dir, monkeypatch):
    spec = shards.resolve(str(digits_dir), None)
    cfg = DataConfig(train="-", batch_size=32, shuffle_buffer=100)
    in_process = batches(spec, cfg, 4)
    loaded = batches(spec, cfg.model_copy(update={"num_workers": 1}), 4)
    for a, b in zip(in_process, loaded, strict=True):
        assert isinstance(b.x, torch.Tensor) and isinstance(b.y, torch.Tensor)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.keys == b.keys
    # A loader process hands over numpy arrays below the limit, tensors (shared memory) above it.
    sample = {
        "x": torch.zeros(8, 8, 1, dtype=torch.uint8),
        "y": 1,
        "key": "k",
        "meta": (0, 0, 0, 0),
        "bad": [],
    }
    monkeypatch.setattr(stream, "get_worker_info", lambda: object())  # as inside a loader process
    small = stream.collate([sample] * 4)
    big = stream.collate([{**sample, "x": torch.zeros(512, 512, 3, dtype=torch.uint8)}] * 2)
    assert not isinstance(small.x, torch.Tensor) and isinstance(big.x, torch.Tensor)
    assert torch.equal(small.tensors().x, torch.zeros(4, 8, 8, 1, dtype=torch.uint8))


def test_cache_config_is_validated():
    with pytest.raises(ValueError, match="cache_mb"):
        DataConfig(train="-", cache_mb=-1)
