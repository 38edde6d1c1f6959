"""The loader at the decode limit: augmentation written straight into the batch (the same pixels as the
numpy crop and flip it replaces), shared batch buffers that a loader process reuses only once the
consumer has let go of a batch, and a window's decoded samples not kept beyond their batch."""

import gc
import pickle
import random
import weakref
from multiprocessing.reduction import ForkingPickler
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.bench.loader import write_noise
from pipeline.config import AugmentConfig, DataConfig
from pipeline.data import cursor as cur
from pipeline.data import shards, stream
from pipeline.data.decode import Decoder
from pipeline.data.transforms import augment


def numpy_augment(image, cfg, rng):
    """The augmentation as it was written before it moved to torch: the reference for the pixels."""
    pad = cfg.crop_padding
    if cfg.hflip and rng.random() < 0.5:
        image = image[:, ::-1]
    if pad <= 0:
        return np.ascontiguousarray(image)
    height, width = image.shape[:2]
    dy, dx = rng.randint(-pad, pad), rng.randint(-pad, pad)
    out = np.zeros_like(image)
    src_y, dst_y = slice(max(dy, 0), height + min(dy, 0)), slice(max(-dy, 0), height + min(-dy, 0))
    src_x, dst_x = slice(max(dx, 0), width + min(dx, 0)), slice(max(-dx, 0), width + min(-dx, 0))
    out[dst_y, dst_x] = image[src_y, src_x]
    return out


@pytest.fixture(params=[1, 2], ids=["1 thread (loader processes: torch's flip)", "2 threads (numpy)"])
def intra_op_threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(28, 28), (17, 23, 3), (9, 31, 1), (12, 10, 4)])
@pytest.mark.parametrize(("pad", "hflip"), [(0, True), (3, False), (4, True)])
def test_augment_gives_the_pixels_of_the_numpy_crop_and_flip(shape, pad, hflip, intra_op_threads):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    cfg = SimpleNamespace(crop_padding=pad, hflip=hflip)
    for seed in range(30):
        ours, reference = (
            augment(image, cfg, random.Random(seed)),
            numpy_augment(image, cfg, random.Random(seed)),
        )
        assert ours.shape == reference.shape and ours.flags.c_contiguous
        assert np.array_equal(ours, reference), seed


@pytest.fixture(scope="module")
def noise_dir(tmp_path_factory):
    # 48x48 RGB in batches of 256: 1.7 MB, above INBAND_MAX_BYTES, so batches travel in shared buffers
    return write_noise(tmp_path_factory.mktemp("noise") / "data", 1200, side=48)


def stream_batches(spec, n, keep):
    cfg = DataConfig(
        train="-",
        batch_size=256,
        num_workers=2,
        shuffle_buffer=300,
        augment=AugmentConfig(crop_padding=4, hflip=True),
    )
    source = stream.TrainBatches(spec, cfg, 0, 1, seed=5)
    try:
        out = []
        for _ in range(n):
            batch = next(source)
            out.append(batch if keep else (batch.x.clone(), batch.keys))
            del batch
        return out
    finally:
        source.close()


def test_batches_the_consumer_keeps_are_never_overwritten(noise_dir):
    spec = shards.resolve(str(noise_dir), None)
    assert stream.INBAND_MAX_BYTES < 256 * 48 * 48 * 3
    n = 12  # more than two epochs: each loader process fills more batches than it has buffers
    kept = stream_batches(spec, n, keep=True)
    views = [batch.x[:2] for batch in kept[:3]]
    del kept[:3]  # a view keeps its batch's buffer in use as well
    gc.collect()
    expected = stream_batches(spec, n, keep=False)
    assert [b.keys for b in kept] == [keys for _, keys in expected[3:]]
    assert all(torch.equal(b.x, x) for b, (x, _) in zip(kept, expected[3:], strict=True))
    assert all(torch.equal(v, x[:2]) for v, (x, _) in zip(views, expected, strict=False))


def sample(x):
    return {"x": x, "crop": None, "y": 1, "key": "k", "meta": (0, 0, 0, 0), "bad": []}


def test_a_shared_buffer_is_reused_once_the_received_batch_is_gone(monkeypatch):
    monkeypatch.setattr(stream, "get_worker_info", lambda: object())  # as inside a loader process
    monkeypatch.setattr(stream, "SHARED_BUFFERS", stream.SharedBuffers())
    big = torch.arange(2 * 512 * 512 * 3, dtype=torch.int64).remainder(251).to(torch.uint8)
    images = big.view(2, 512, 512, 3)
    sent = stream.collate([sample(images[0]), sample(images[1])])
    assert sent.buffer is not None and sent.buffer[0] == 1 and isinstance(sent.y, np.ndarray)
    received = pickle.loads(ForkingPickler.dumps(sent))  # what the DataLoader's queue does
    assert received.buffer is None and torch.equal(received.tensors().x, images)
    buffer, row = sent.buffer, received.x[1]
    del sent
    assert stream.collate([sample(images[0])] * 2).buffer is not buffer  # still in use: a new one
    del received
    gc.collect()
    assert buffer[0] == 1  # a view of the batch lives on
    del row
    gc.collect()
    assert buffer[0] == 0  # released: the loader process fills it again
    again = stream.collate([sample(images[1]), sample(images[0])])
    assert again.buffer is buffer and torch.equal(again.x, images.flip(0))


def test_a_windows_decoded_samples_live_only_until_they_are_batched(noise_dir):
    spec = shards.resolve(str(noise_dir), None)
    layout = cur.Layout(tuple(spec.train_counts), 0, True, 300)
    samples = stream.ShardStream(
        spec.train_urls, layout, cur.Cursor.fresh(1, 0), 0, Decoder(spec, None, 0), on_error="strict"
    )
    items = iter(samples)
    first = weakref.ref(next(items)["x"])
    for _ in range(10):
        next(items)
    gc.collect()
    assert first() is None  # a window holds its encoded samples, not every decoded one
