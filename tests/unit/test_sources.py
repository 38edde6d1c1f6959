"""`pipeline data prepare` sources beyond the built-in digits: imagefolder, npz, synthetic images."""

import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, DataConfig
from pipeline.data import shards, sources, stream
from pipeline.data.transforms import decode_array, decode_image


def shard_payloads(out):
    """{key: {ext: bytes}} over every shard of a prepared dir."""
    found = {}
    for info in shards.read_manifest(out)["splits"].values():
        for shard in info["shards"]:
            with tarfile.open(out / shard["name"]) as tar:
                for member in tar:
                    key, ext = member.name.split(".", 1)
                    found.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return found


@pytest.fixture
def image_folder(tmp_path):
    """3 classes; PNG (grey), JPEG and BMP (colour), two sizes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    files = {}
    for c, (name, fmt, ext, mode) in enumerate(
        [("cat", "PNG", "png", "L"), ("dog", "JPEG", "jpg", "RGB"), ("eel", "BMP", "bmp", "RGB")]
    ):
        (root / name).mkdir(parents=True)
        for i in range(7):
            size = (12, 10) if i % 2 else (16, 16)
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            path = root / name / f"img{i}.{ext}"
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, format=fmt)
            files[path] = c
    return root, files


def test_imagefolder_round_trips_counts_classes_and_pixels(image_folder, tmp_path):
    root, files = image_folder
    out = tmp_path / "prepared"
    manifest = shards.write_prepared(
        sources.load_source(f"imagefolder:{root}"), out, samples_per_shard=4, val_fraction=0.25, seed=0
    )
    assert manifest["classes"] == ["cat", "dog", "eel"] and manifest["class_map"] == {
        "cat": 0,
        "dog": 1,
        "eel": 2,
    }
    assert manifest["sample_shape"] is None  # two sizes
    assert manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"] == 21
    assert shards.inspect_prepared(out) == []

    payloads = shard_payloads(out)
    assert len(payloads) == 21
    ordered = sorted(files, key=lambda p: (p.parent.name, p.name))  # the source's sample order
    for i, path in enumerate(ordered):
        sample = payloads[f"imagefolder-folder-{i:06d}"]
        assert int(sample["cls"]) == files[path]
        (ext,) = [e for e in sample if e != "cls"]
        assert ext == {"png": "png", "jpg": "jpg", "bmp": "png"}[path.suffix[1:]]  # BMP stored as PNG
        if ext == "jpg":
            assert sample[ext] == path.read_bytes()  # JPEG bytes kept as they are, no re-encoding
        np.testing.assert_array_equal(decode_image(sample[ext]), np.asarray(Image.open(path)))


def test_imagefolder_needs_image_size_to_train_then_resizes(image_folder, tmp_path):
    root, _ = image_folder
    out = tmp_path / "prepared"
    shards.write_prepared(
        sources.load_source(f"imagefolder:{root}"), out, samples_per_shard=4, val_fraction=0.25
    )
    with pytest.raises(ConfigError, match=r"'data.image_size'"):
        shards.resolve(str(out), None)
    spec = shards.resolve(str(out), None, image_size=(8, 8))
    assert spec.sample_shape == [1, 8, 8]  # channels of the first image (grey); colour ones are converted
    batch = next(stream.eval_batches(spec, DataConfig(train=str(out), batch_size=5), 0, 1))
    assert batch.x.shape == (5, 8, 8, 1)  # uint8 HWC; normalize() makes it NCHW float on the device


def test_npz_images_and_sequences(tmp_path):
    rng = np.random.default_rng(1)
    images = tmp_path / "images.npz"
    np.savez(images, x=rng.integers(0, 256, (40, 6, 5), dtype=np.uint8), y=rng.integers(0, 4, 40))
    out = tmp_path / "img"
    manifest = shards.write_prepared(sources.load_source(f"npz:{images}"), out, samples_per_shard=10)
    assert (
        manifest["kind"] == "image" and manifest["sample_shape"] == [1, 6, 5] and manifest["num_classes"] == 4
    )

    series = tmp_path / "series.npz"
    x = rng.normal(size=(30, 12, 2)).astype(np.float32)
    np.savez(series, x=x, y=np.arange(30) % 3)
    out = tmp_path / "seq"
    manifest = shards.write_prepared(sources.load_source(f"npz:{series}"), out, samples_per_shard=10)
    assert manifest["kind"] == "sequence" and manifest["sample_shape"] == [12, 2]
    payloads = shard_payloads(out)
    np.testing.assert_array_equal(decode_array(payloads["npz-series-000004"]["npy"]), x[4])
    spec = shards.resolve(str(out), None)
    batch = next(stream.eval_batches(spec, DataConfig(train=str(out), batch_size=6), 0, 1))
    assert batch.x.shape == (6, 12, 2) and batch.x.dtype.is_floating_point


def test_synthetic_images_are_realistic_jpegs(tmp_path):
    out = tmp_path / "syn"
    manifest = shards.write_prepared(
        sources.load_source("synthetic-images:24:64x48"),
        out,
        samples_per_shard=100,
        shard_size_mb=0.05,
        val_fraction=0.25,
    )
    assert manifest["sample_shape"] == [3, 64, 48]
    train = manifest["splits"]["train"]["shards"]
    assert len(train) > 1 and all(s["bytes"] < 0.05e6 + 20_000 for s in train)  # cut by size, not count
    payloads = shard_payloads(out)
    assert all(set(p) == {"jpg", "cls"} for p in payloads.values())
    assert decode_image(next(iter(payloads.values()))["jpg"]).shape == (64, 48, 3)


@pytest.mark.parametrize("spec", ["imagenet", "npz", "synthetic-images:abc", "imagefolder:/nonexistent"])
def test_bad_source_specs(spec):
    with pytest.raises(ConfigError):
        sources.load_source(spec)
