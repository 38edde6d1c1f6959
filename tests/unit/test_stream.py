"""The training stream: split, seeded order, exact and elastic mid-epoch resume, corrupt-data policy."""

import json
import random
import tarfile

import pytest
import torch

from pipeline import config
from pipeline.config import DataConfig
from pipeline.data import cursor as cur
from pipeline.data import shards, stream
from pipeline.data.shards import DataError
from pipeline.data.transforms import normalize
from pipeline.launch.plan import make_plan


def take(spec, cfg, world, steps, cursor=None):
    """Run `steps` lock-step batches on every rank; returns [(rank keys, rank epochs) per rank] per step
    and the cursor state those ranks would checkpoint."""
    ranks = [stream.TrainBatches(spec, cfg, r, world, seed=7, cursor=cursor) for r in range(world)]
    trace = []
    for _ in range(steps):
        trace.append([(b.keys, b.epochs) for b in (next(r) for r in ranks)])
    state = cur.merge_rank_states([r.local_state() for r in ranks]).to_dict()
    for r in ranks:
        r.close()  # the loader processes die with the streams: nothing survives but `state`
    return trace, json.loads(json.dumps(state))  # and it survives JSON, as in a checkpoint


def keys_of_epoch(trace, epoch):
    return [
        k for step in trace for keys, epochs in step for k, e in zip(keys, epochs, strict=True) if e == epoch
    ]


def shard_keys(url):
    with tarfile.open(url) as tar:
        return [m.name.split(".")[0] for m in tar if m.name.endswith(".cls")]


def all_train_keys(spec):
    return [k for url in spec.train_urls for k in shard_keys(url)]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop_at", ["random", "after_epoch_boundary"])
def test_exact_resume_equals_the_unbroken_stream(digits_dir, num_workers, stop_at):
    spec = shards.resolve(str(digits_dir), None)
    cfg = DataConfig(train=str(digits_dir), batch_size=32, num_workers=num_workers, shuffle_buffer=300)
    total = 30  # 30 x 64 samples > one epoch of 1,438
    unbroken, _ = take(spec, cfg, 2, total)
    assert len({e for step in unbroken for _, epochs in step for e in epochs}) == 2  # crosses the boundary
    k = random.Random(f"{num_workers}").randint(3, 20) if stop_at == "random" else 25

    first, state = take(spec, cfg, 2, k)
    assert first == unbroken[:k]
    second, _ = take(spec, cfg, 2, total - k, cur.Cursor.from_dict(state))
    assert second == unbroken[k:], f"order after resuming at step {k} differs"

    epoch0 = keys_of_epoch(first + second, 0)
    assert sorted(epoch0) == sorted(all_train_keys(spec))  # every sample once, none twice


@pytest.mark.parametrize("num_workers", [0, 2])
def test_elastic_resume_2_to_1_to_2_sees_every_remaining_sample_once(digits_dir, num_workers):
    spec = shards.resolve(str(digits_dir), None)
    cfg = DataConfig(train=str(digits_dir), batch_size=16, num_workers=num_workers, shuffle_buffer=300)
    a, state = take(spec, cfg, 2, 9)  # 288 samples on 2 ranks
    b, state = take(spec, cfg, 1, 21, cur.Cursor.from_dict(state))  # 336 samples on 1 rank
    c, _ = take(spec, cfg, 2, 40, cur.Cursor.from_dict(state))  # the rest of the epoch and beyond
    epoch0 = keys_of_epoch(a, 0) + keys_of_epoch(b, 0) + keys_of_epoch(c, 0)
    assert len(epoch0) == len(set(epoch0))
    assert sorted(epoch0) == sorted(all_train_keys(spec))
    assert keys_of_epoch(c, 1)  # and the next epoch goes on normally


def test_remap_bookkeeping_matches_what_was_consumed(digits_dir):
    """The cursor alone (no I/O) says which samples are consumed; it agrees with the keys seen."""
    spec = shards.resolve(str(digits_dir), None)
    cfg = DataConfig(train=str(digits_dir), batch_size=20, shuffle_buffer=200)
    trace, state = take(spec, cfg, 2, 11)
    layout = stream.layout_for(spec, cfg, 7)
    consumed = cur.consumed_in_epoch(layout, cur.Cursor.from_dict(state), 0)
    n = sum(spec.train_counts[s] for s in consumed.full) + sum(len(i) for i in consumed.partial.values())
    assert n == len(keys_of_epoch(trace, 0)) == 440


def test_seed_changes_the_order_but_not_the_set(digits_dir):
    spec = shards.resolve(str(digits_dir), None)
    cfg = DataConfig(train=str(digits_dir), batch_size=64, shuffle_buffer=256)
    one = stream.TrainBatches(spec, cfg, 0, 1, seed=1)
    two = stream.TrainBatches(spec, cfg, 0, 1, seed=2)
    a = [k for _ in range(23) for k in next(one).keys][:1438]
    b = [k for _ in range(23) for k in next(two).keys][:1438]
    assert a != b and sorted(a) == sorted(b) == sorted(all_train_keys(spec))


def test_too_few_shards_fails_with_the_number_needed(digits_dir):
    spec = shards.resolve(str(digits_dir), None)
    with pytest.raises(DataError, match=r"12 shard\(s\).*need at least 16.*--samples-per-shard"):
        stream.check_shard_count(spec, world_size=4, loader_workers=4)
    stream.check_shard_count(spec, world_size=2, loader_workers=2)


def test_dry_run_shards_per_worker_are_what_the_stream_reads(digits_dir, tmp_path):
    """12 shards, 2 workers x 4 loader processes (8 readers): what `--dry-run` prints per worker is what
    each rank's real DataLoader processes read in the first epoch (reader g takes every 8th shard from
    g on, so rank 0's readers 0-3 hold 8 shards and rank 1's readers 4-7 hold 4), and what the start
    summary reports (`assignment`)."""
    cfg = config.load(
        "configs/smoke.yaml",
        [
            f"data.train={digits_dir}",
            f"run_dir={tmp_path / 'run'}",
            "cluster.num_workers=2",
            "data.num_workers=4",
            "data.batch_size=16",
            "tracking.wandb.mode=disabled",
        ],
    )
    plan = make_plan(cfg)
    assert len(plan.spec.train_urls) == 12
    shard_of = {key: i for i, url in enumerate(plan.spec.train_urls) for key in shard_keys(url)}
    read, summary = [], []
    for rank in range(2):
        batches = stream.TrainBatches(plan.spec, plan.cfg.data, rank, 2, seed=plan.cfg.seed)
        try:
            summary.append(batches.assignment()[0])
            shards_read: set[int] = set()
            into_epoch_1: set[int] = set()  # readers (loader processes) that have finished epoch 0
            for _ in range(500):
                batch = next(batches)
                shards_read |= {shard_of[k] for k, e in zip(batch.keys, batch.epochs, strict=True) if e == 0}
                if max(batch.epochs) > 0:
                    into_epoch_1.add(batch.meta[0])
                if len(into_epoch_1) == 4:
                    break
            assert len(into_epoch_1) == 4
            read.append(len(shards_read))
        finally:
            batches.close()
    assert read == [8, 4]
    assert plan.shards_per_worker() == read == summary
    assert "shards/worker [8, 4]" in plan.describe()


def test_eval_batches_partition_val_across_ranks(digits_dir):
    spec = shards.resolve(str(digits_dir), None)
    cfg = DataConfig(train=str(digits_dir), batch_size=50)
    keys = [k for rank in range(2) for b in stream.eval_batches(spec, cfg, rank, 2) for k in b.keys]
    assert len(keys) == len(set(keys)) == spec.val_samples
    batch = next(stream.eval_batches(spec, cfg, 0, 2))
    assert batch.x.shape == (50, 8, 8, 1) and batch.x.dtype == torch.uint8 and batch.y.max() < 10
    x = normalize(batch.x, spec.mean, spec.std)
    assert x.shape == (50, 1, 8, 8)
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 0.5  # normalised with the MANIFEST's mean/std
    # one channel: plain NCHW strides (the permuted view's stride-1 channel dim crashed oneDNN's conv
    # backward with ResNet-18 on an AVX2-only CPU), the same values as the permuted view
    assert x.stride() == (64, 64, 8, 1)
    permuted = (batch.x.permute(0, 3, 1, 2).float() / 255.0 - spec.mean[0]) / spec.std[0]
    assert torch.allclose(x, permuted)
    rgb = normalize(torch.zeros(2, 4, 4, 3, dtype=torch.uint8), [0.0] * 3, [1.0] * 3)
    assert rgb.shape == (2, 3, 4, 4) and rgb.is_contiguous(memory_format=torch.channels_last)


# --- corrupt data -----------------------------------------------------------------------------------


def test_strict_mode_names_shard_and_key_for_each_damage(corrupt_digits):
    out, names, expected = corrupt_digits
    with pytest.raises(DataError, match=r"3 of 10 shard|not found.*train-000003"):
        shards.resolve(str(out), None)  # a missing local shard is caught before anything starts
    spec = shards.resolve(str(out), None, missing_ok=True)

    def first_error(shard_index):
        layout = cur.Layout((spec.train_counts[shard_index],), 0, False, 0)
        ds = stream.ShardStream(
            [spec.train_urls[shard_index]],
            layout,
            cur.Cursor.fresh(1, 0),
            0,
            stream.Decoder(spec, None, 0),
            on_error="strict",
            infinite=False,
        )
        with pytest.raises(DataError) as info:
            list(ds)
        return str(info.value)

    message = first_error(0)
    assert names[0] in message and expected["garbage"][1] in message and "undecodable" in message
    message = first_error(1)
    assert names[1] in message and expected["unlabeled"][1] in message and "label" in message
    message = first_error(2)
    assert names[2] in message and ("unexpected end" in message or "#50" in message)
    message = first_error(3)
    assert names[3] in message and "cannot be opened" in message


def test_skip_mode_counts_every_bad_sample_exactly_once(corrupt_digits):
    out, names, expected = corrupt_digits
    spec = shards.resolve(str(out), None, missing_ok=True)
    cfg = DataConfig(train=str(out), batch_size=30, shuffle_buffer=0, on_error="skip")
    # No shuffle: rank 0 reads shards 0, 2, 4 ..., rank 1 shards 1, 3, 5 ...; 12 steps cover shards 0-7.
    ranks = [stream.TrainBatches(spec, cfg, r, 2, seed=0) for r in range(2)]
    bad = [b for _ in range(12) for r in ranks for b in next(r).bad]
    by_kind = {
        "garbage": [b for b in bad if b.key == expected["garbage"][1]],
        "unlabeled": [b for b in bad if b.key == expected["unlabeled"][1]],
        "truncated": [b for b in bad if b.shard.endswith(names[2])],
        "missing": [b for b in bad if b.shard.endswith(names[3])],
    }
    assert len(by_kind["garbage"]) == 1 and len(by_kind["unlabeled"]) == 1
    assert len(by_kind["truncated"]) == expected["truncated_lost"]
    assert len(by_kind["missing"]) == expected["missing"]
    assert len(bad) == 1 + 1 + expected["truncated_lost"] + expected["missing"]


def test_pipe_urls_stream_the_same_samples(digits_dir):
    local = shards.resolve(str(digits_dir), None)
    piped = shards.resolve(
        f"pipe:cat {digits_dir}/train-{{000000..000011}}.tar",
        f"pipe:cat {digits_dir}/val-{{000000..000002}}.tar",
    )
    assert piped.train_counts == local.train_counts and piped.train_urls[0].startswith("pipe:cat ")
    cfg = DataConfig(train="-", batch_size=50, shuffle_buffer=100)
    a, b = stream.TrainBatches(local, cfg, 0, 1, seed=3), stream.TrainBatches(piped, cfg, 0, 1, seed=3)
    assert [next(a).keys for _ in range(5)] == [next(b).keys for _ in range(5)]


def test_augmentation_is_reproducible_across_a_resume(digits_dir):
    spec = shards.resolve(str(digits_dir), None)
    cfg = DataConfig(train="-", batch_size=40, shuffle_buffer=200, augment={"crop_padding": 2})
    unbroken = stream.TrainBatches(spec, cfg, 0, 1, seed=5)
    reference = [next(unbroken).x for _ in range(6)]
    first = stream.TrainBatches(spec, cfg, 0, 1, seed=5)
    for _ in range(3):
        next(first)
    state = cur.merge_rank_states([first.local_state()])
    resumed = stream.TrainBatches(spec, cfg, 0, 1, seed=5, cursor=state)
    for expected in reference[3:]:
        assert torch.equal(next(resumed).x, expected)
    plain = stream.TrainBatches(spec, DataConfig(train="-", batch_size=40, shuffle_buffer=200), 0, 1, seed=5)
    assert not torch.equal(next(plain).x, reference[0])  # the augmentation did change pixels
