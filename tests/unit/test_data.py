import tarfile
from collections import Counter

import pytest

from pipeline.config import DataConfig
from pipeline.data import shards, sources, stream
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


def test_split_covers_every_sample_once(digits_dir):
    """2 ranks x 2 DataLoader processes, one epoch: every train key exactly once."""
    from torch.utils.data import DataLoader

    spec = shards.resolve(str(digits_dir), None)
    keys = []
    for rank in range(2):
        ds = stream.ShardStream(
            spec.train_urls,
            spec,
            stream.StreamPosition(rank, 2, seed=0),
            shuffle_buffer=64,
            infinite=False,
            on_error="strict",
            with_keys=True,
        )
        keys += [key for _, _, key in DataLoader(ds, batch_size=None, num_workers=2)]
    assert len(keys) == len(set(keys)) == spec.train_samples == 1438


def test_eval_loader_partitions_val_across_ranks(digits_dir):
    spec = shards.resolve(str(digits_dir), None)
    cfg = DataConfig(train=str(digits_dir), batch_size=50)
    counts = [sum(len(y) for _, y in stream.eval_loader(spec, cfg, rank, 2)) for rank in range(2)]
    assert sum(counts) == spec.val_samples and all(c > 0 for c in counts)
    x, y = next(iter(stream.eval_loader(spec, cfg, 0, 2)))
    assert x.shape == (50, 1, 8, 8) and x.dtype.is_floating_point and y.max() < 10
    assert abs(float(x.mean())) < 0.5  # normalised with the MANIFEST's mean/std


def test_train_stream_is_seeded_and_infinite(digits_dir):
    spec = shards.resolve(str(digits_dir), None)
    cfg = DataConfig(train=str(digits_dir), batch_size=64, shuffle_buffer=256)

    def first_labels(seed, n_batches):
        it = iter(stream.train_loader(spec, cfg, 0, 2, seed))
        return [next(it)[1].tolist() for _ in range(n_batches)]

    a = first_labels(0, 15)  # 15 x 64 > 719 samples of rank 0: crosses into epoch 1
    assert a == first_labels(0, 15)
    assert a != first_labels(1, 15)


def test_too_few_shards_fails_with_the_number_needed(digits_dir):
    spec = shards.resolve(str(digits_dir), None)
    with pytest.raises(DataError, match=r"12 shard\(s\).*need at least 16.*--samples-per-shard"):
        stream.check_shard_count(spec, world_size=4, loader_workers=4)
    stream.check_shard_count(spec, world_size=2, loader_workers=2)


def test_strict_policy_names_shard_and_key(tmp_path):
    out = tmp_path / "d"
    shards.write_prepared(
        sources.digits(), out, samples_per_shard=400, val_fraction=0.2, seed=0, overwrite=False
    )
    path = out / "val-000000.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    bad_key = members[0][0].name.split(".")[0]
    with tarfile.open(path, "w") as tar:
        for m, payload in members:
            if m.name == f"{bad_key}.png":
                payload = b"not an image"
            m.size = len(payload)
            import io

            tar.addfile(m, io.BytesIO(payload))
    spec = shards.resolve(str(out), None)
    cfg = DataConfig(train=str(out), batch_size=8)
    with pytest.raises(DataError, match=rf"{bad_key}.*val-000000.tar"):
        list(stream.eval_loader(spec, cfg, 0, 1))
