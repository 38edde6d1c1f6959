import tarfile
from collections import Counter

import pytest

from pipeline.data import shards, sources
from pipeline.data.shards import DataError


def test_prepare_is_deterministic_and_stratified(tmp_path, digits_dir):
    again = tmp_path / "again"
    shards.write_prepared(
        sources.digits(), again, samples_per_shard=128, val_fraction=0.2, seed=0, overwrite=False
    )
    first = shards.read_manifest(digits_dir)
    second = shards.read_manifest(again)
    assert first["splits"] == second["splits"]  # same seed -> same shards, byte for byte (sha256)
    assert first["splits"]["train"]["samples"] + first["splits"]["val"]["samples"] == 1797
    assert first["sample_shape"] == [1, 8, 8] and first["num_classes"] == 10
    # stratified: every class is in val in proportion
    spec = shards.resolve(str(digits_dir), None)
    labels = Counter()
    for url in spec.val_urls:
        with tarfile.open(url) as tar:
            for m in tar:
                if m.name.endswith(".cls"):
                    labels[int(tar.extractfile(m).read())] += 1
    assert set(labels) == set(range(10)) and min(labels.values()) >= 30


def test_prepare_refuses_to_overwrite(digits_dir):
    before = (digits_dir / "MANIFEST.json").read_text()
    with pytest.raises(Exception, match="not empty.*--overwrite"):
        shards.write_prepared(
            sources.digits(), digits_dir, samples_per_shard=64, val_fraction=0.2, seed=1, overwrite=False
        )
    assert (digits_dir / "MANIFEST.json").read_text() == before


def test_inspect_finds_corruption(tmp_path):
    out = tmp_path / "d"
    shards.write_prepared(
        sources.digits(), out, samples_per_shard=400, val_fraction=0.2, seed=0, overwrite=False
    )
    assert shards.inspect_prepared(out) == []
    victim = out / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[2000] ^= 0xFF
    victim.write_bytes(bytes(data))
    (out / "val-000000.tar").unlink()
    problems = shards.inspect_prepared(out)
    assert any("train-000001.tar" in p and "sha256" in p for p in problems)
    assert any("val-000000.tar" in p and "missing" in p for p in problems)


def test_resolve_errors_name_the_key(tmp_path, digits_dir):
    with pytest.raises(DataError, match=r"'data.train'.*does not exist.*pipeline data prepare"):
        shards.resolve(str(tmp_path / "missing"), None)
    with pytest.raises(DataError, match=r"'data.val'.*not found"):
        shards.resolve(str(digits_dir), str(tmp_path / "val-{000..002}.tar"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no MANIFEST.json"):
        shards.resolve(str(empty), None)


def test_shard_urls_with_brace_pattern(digits_dir):
    spec = shards.resolve(
        f"{digits_dir}/train-{{000000..000011}}.tar", f"{digits_dir}/val-{{000000..000002}}.tar"
    )
    assert len(spec.train_urls) == 12 and len(spec.val_urls) == 3
    assert spec.sample_shape == [1, 8, 8]
