"""`pipeline data index`: users' own WebDataset shards (written here by webdataset's ShardWriter, as a
user would) get a MANIFEST without being rewritten, and the run decodes them by data.fields/data.decode.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from typer.testing import CliRunner

from pipeline import config
from pipeline.data import index, shards, stream
from pipeline.data.shards import DataError
from pipeline.data.transforms import decode_image

# The five layouts users write most: each maps (uint8 pixels, int label) to a ShardWriter sample.
LAYOUTS = {
    "png": lambda pixels, label: {"png": pixels, "cls": label},
    "jpg": lambda pixels, label: {"jpg": pixels, "cls": label},
    "json": lambda pixels, label: {"png": pixels, "json": {"label": label}},
    "npy": lambda pixels, label: {"npy": pixels, "cls": label},
    "input.npy": lambda pixels, label: {"input.npy": pixels, "target.cls": label},
}


def write_layout(prepared: Path, out: Path, layout: str) -> Path:
    """The samples of a prepared dataset, same keys, order and shard boundaries, rewritten by ShardWriter
    in `layout` into `out` (train-*.tar, val-*.tar, no MANIFEST). Returns `out`."""
    manifest = shards.read_manifest(prepared)
    out.mkdir(parents=True)
    for split, info in manifest["splits"].items():
        per_shard = max(s["samples"] for s in info["shards"])
        with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
            for shard in info["shards"]:
                for sample in stream.read_shard(str(prepared / shard["name"]), {}, strict=True)[0]:
                    pixels, label = decode_image(sample["png"]), int(sample["cls"])
                    sink.write({"__key__": sample["__key__"], **LAYOUTS[layout](pixels, label)})
    return out


def index_layout(prepared: Path, tmp: Path, layout: str, **kw) -> Path:
    """write_layout + `index_shards` into a separate dir (so the MANIFEST records a root)."""
    shard_dir = write_layout(prepared, tmp / f"{layout}-shards", layout)
    manifest = shards.read_manifest(prepared)
    last = {split: len(info["shards"]) - 1 for split, info in manifest["splits"].items()}
    out = tmp / f"{layout}-index"
    index.index_shards(
        f"{shard_dir}/train-{{000000..{last['train']:06d}}}.tar",
        out,
        val=f"{shard_dir}/val-{{000000..{last['val']:06d}}}.tar",
        echo=lambda line: None,
        **kw,
    )
    return out


def cli(*args: str):
    """The CLI in this process (a subprocess would pay the imports again): (exit code, stdout, stderr)."""
    from pipeline.__main__ import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def indexed(digits_dir, tmp_path_factory) -> dict[str, Path]:
    """The digits in each layout, indexed: {layout: index dir}."""
    tmp = tmp_path_factory.mktemp("indexed")
    return {layout: index_layout(digits_dir, tmp, layout) for layout in LAYOUTS}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_manifest_of_each_layout(indexed, digits_dir, layout):
    prepared = shards.read_manifest(digits_dir)
    manifest = shards.read_manifest(indexed[layout])
    input_key, target_key = {
        "png": ("png", "cls"),
        "jpg": ("jpg", "cls"),
        "json": ("png", "json.label"),
        "npy": ("npy", "cls"),
        "input.npy": ("input.npy", "target.cls"),
    }[layout]
    assert manifest["format"] == shards.FORMAT_INDEXED
    assert manifest["fields"] == {"input": input_key, "target": target_key}
    assert manifest["keys"] == sorted({input_key, target_key.split(".label")[0]})
    assert manifest["root"] == str(indexed[layout].parent / f"{layout}-shards")
    assert manifest["kind"] == "image" and manifest["sample_shape"] == [1, 8, 8] and manifest["channels"] == 1
    assert manifest["classes"] == [str(i) for i in range(10)] and manifest["num_classes"] == 10
    assert manifest["class_map"] == {str(i): i for i in range(10)} and manifest["label_type"] == "int"
    for split in ("train", "val"):  # the same boundaries as the prepared shards, named relative to root
        ours, theirs = manifest["splits"][split], prepared["splits"][split]
        assert ours["samples"] == theirs["samples"]
        assert [(s["name"], s["samples"]) for s in ours["shards"]] == [
            (s["name"], s["samples"]) for s in theirs["shards"]
        ]
        for shard in ours["shards"]:
            path = Path(manifest["root"]) / shard["name"]
            assert shard["bytes"] == path.stat().st_size
            assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert shard["keys"] == manifest["keys"]
    # statistics over all 1,797 inputs, as prepare computes them: equal in float32 when lossless
    stats = np.float32(manifest["normalize"]["mean"] + manifest["normalize"]["std"])
    reference = np.float32(prepared["normalize"]["mean"] + prepared["normalize"]["std"])
    if layout == "jpg":
        assert np.allclose(stats, reference, atol=2e-3)
    else:
        assert (stats == reference).all()
    assert manifest["stats_samples"] == 1797 and manifest["bad_samples"] == 0


@pytest.mark.parametrize("layout", ["npy", "input.npy", "json"])
def test_each_layout_decodes_to_the_prepared_pixels_and_labels(indexed, digits_dir, layout):
    cfg = config.DataConfig(train=str(indexed[layout]))
    ours, theirs = shards.resolve(str(indexed[layout]), None), shards.resolve(str(digits_dir), None)
    stream.check_first_sample(ours, cfg)
    assert (ours.train_counts, ours.val_counts) == (theirs.train_counts, theirs.val_counts)
    a = stream.read_shard(ours.train_urls[1], {}, True)[0]
    b = stream.read_shard(theirs.train_urls[1], {}, True)[0]
    decoder, reference = stream.Decoder(ours, None, 0, cfg.fields), stream.Decoder(theirs, None, 0)
    for x, y in zip(a, b, strict=True):
        assert x["__key__"] == y["__key__"]
        (px, lx), (py, ly) = decoder.decode(x), reference.decode(y)
        assert lx == ly and px.dtype == np.uint8 and (px == py).all()


def test_index_never_modifies_the_shards_and_writes_only_the_manifest(digits_dir, tmp_path):
    shard_dir = write_layout(digits_dir, tmp_path / "shards", "png")
    before = digest(shard_dir)
    code, out, err = cli("data", "index", str(shard_dir), "--out", str(shard_dir), "--val-fraction", "0.2")
    assert code == 0, err
    assert "samples in 12 shard(s)" in out and "input png, target cls" in out
    after = digest(shard_dir)
    assert set(after) == set(before) | {"MANIFEST.json"}
    assert {name: after[name] for name in before} == before
    manifest = json.loads((shard_dir / "MANIFEST.json").read_text())
    assert "root" not in manifest  # the MANIFEST sits beside its shards: names are relative to it
    val = [s["name"] for s in manifest["splits"]["val"]["shards"]]
    train = [s["name"] for s in manifest["splits"]["train"]["shards"]]
    assert len(val) == 3 and len(train) == 12 and not set(val) & set(train)  # round(0.2 x 15) whole shards
    assert manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"] == 1797
    # seeded: the same command picks the same val shards; another seed others
    again = index.index_shards(str(shard_dir), tmp_path / "again", val_fraction=0.2, echo=lambda line: None)
    assert [s["name"] for s in again["splits"]["val"]["shards"]] == val
    other = index.index_shards(
        str(shard_dir), tmp_path / "other", val_fraction=0.2, seed=1, echo=lambda line: None
    )
    assert [s["name"] for s in other["splits"]["val"]["shards"]] != val
    # inspect reads an indexed dir like a prepared one, and verifies the shards under its root
    code, out, err = cli("data", "inspect", str(tmp_path / "again"))
    assert code == 0, err
    assert "fields: input png, target cls" in out and "all shards verified" in out and "root " in out
    with pytest.raises(DataError, match="exists; pass --overwrite"):
        index.index_shards(str(shard_dir), shard_dir, val_fraction=0.2, echo=lambda line: None)


def test_named_classes_and_a_user_decode_function(tmp_path):
    """Class names in JSON become a sorted class map; a decode function's output defines the shape."""
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    rng = np.random.default_rng(0)
    names = ["cat", "dog", "emu"]
    with wds.ShardWriter(str(shard_dir / "s-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(30):
            sink.write(
                {
                    "__key__": f"k{i:03d}",
                    "pixels.bin": rng.integers(0, 255, 12, dtype=np.uint8).tobytes(),
                    "meta.json": {"kind": names[i % 3]},
                }
            )
    module = tmp_path / "mydecode.py"
    module.write_text(
        "import json\nimport numpy as np\n\n"
        "def decode(sample):\n"
        "    meta = json.loads(sample['meta.json'])\n"
        "    if meta['kind'] == 'boom':\n"
        "        raise KeyError('boom')\n"
        "    return np.frombuffer(sample['pixels.bin'], np.uint8).reshape(3, 4), meta['kind']\n"
    )
    out = tmp_path / "index"
    manifest = index.index_shards(
        str(shard_dir), out, val_fraction=0.34, decode=f"{module}:decode", echo=lambda line: None
    )
    assert manifest["classes"] == names and manifest["label_type"] == "name"
    assert manifest["sample_shape"] == [1, 3, 4] and manifest["decode"] == f"{module}:decode"
    assert manifest["fields"] == {"input": None, "target": None}
    spec = shards.resolve(str(out), None)
    with pytest.raises(DataError, match=r"indexed with the decode function .*set data.decode="):
        stream.check_first_sample(spec, config.DataConfig(train=str(out)))
    cfg = config.DataConfig(train=str(out), decode=f"{module}:decode")
    stream.check_first_sample(spec, cfg)
    decoder = stream.Decoder(spec, None, 0, cfg.fields, cfg.decode)
    decoded = [decoder(s, 0) for s in stream.read_shard(spec.train_urls[0], {}, True)[0]]
    assert [label for _, label in decoded] == [i % 3 for i in range(len(decoded))]
    assert decoded[0][0].shape == (3, 4, 1)  # uint8 pixels: the image path (HWC uint8 batches)


def test_float_arrays_are_sequences_and_unlabeled_data_indexes(tmp_path):
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(shard_dir / "s-%06d.tar"), maxcount=8, verbose=0) as sink:
        for i in range(16):
            sink.write({"__key__": f"k{i:03d}", "npy": rng.normal(3.0, 2.0, (5, 4)).astype(np.float32)})
    manifest = index.index_shards(
        str(shard_dir), tmp_path / "index", val_fraction=0.5, echo=lambda line: None
    )
    assert manifest["kind"] == "sequence" and manifest["sample_shape"] == [5, 4]
    assert manifest["label_type"] is None and manifest["num_classes"] == 0
    assert manifest["fields"] == {"input": "npy", "target": None}
    assert (
        abs(manifest["normalize"]["mean"][0] - 3.0) < 0.5 and abs(manifest["normalize"]["std"][0] - 2.0) < 0.5
    )
    spec = shards.resolve(str(tmp_path / "index"), None)
    stream.check_first_sample(spec, config.DataConfig(train="-"))
    value, label = stream.Decoder(spec, None, 0).decode(stream.read_shard(spec.train_urls[0], {}, True)[0][0])
    assert value.dtype.is_floating_point and tuple(value.shape) == (5, 4) and label == -1
    # no labels: a task that needs them is refused before anything starts, one without them plans
    from pipeline.launch.plan import make_plan

    base = [f"data.train={tmp_path / 'index'}", "cluster.num_workers=1", f"run_dir={tmp_path / 'run'}"]
    with pytest.raises(config.ConfigError, match=r"'task.name': task 'classify' trains on labels.*--target"):
        make_plan(config.load("configs/smoke.yaml", [*base, "model.name=mlp"]))
    unlabeled = ["task.name=next_step", "model.name=lstm", "model.args={hidden_size: 4, output: sequence}"]
    assert make_plan(config.load("configs/smoke.yaml", [*base, *unlabeled])).spec.num_classes == 0


# --- refusals ------------------------------------------------------------------------------------------


def test_shards_without_counts_are_refused_naming_pipeline_data_index(digits_dir, tmp_path):
    shard_dir = write_layout(digits_dir, tmp_path / "shards", "png")
    for train in (str(shard_dir), f"{shard_dir}/train-{{000000..000011}}.tar"):
        with pytest.raises(DataError, match=r"no MANIFEST.json.*`pipeline data index SHARDS --out DIR`"):
            shards.resolve(train, f"{shard_dir}/val-{{000000..000002}}.tar")
    code, _, err = cli("train", "configs/smoke.yaml", f"data.train={shard_dir}", "cluster.launcher=local")
    assert code == 2 and "pipeline data index" in err


def test_a_missing_part_of_a_url_list_is_named(digits_dir, tmp_path):
    first, second = f"{digits_dir}/train-000000.tar", f"{digits_dir}/train-000001.tar"
    spec = shards.resolve(f"{first}::{second}", f"{digits_dir}/val-000000.tar")
    assert spec.train_urls == [first, second] and spec.train_counts == [128, 128]
    missing = f"{digits_dir}/nothing-{{000..003}}x.tar"
    with pytest.raises(DataError, match=r"'data.train': part 2 of 3 \(.*/gone.tar\) does not exist"):
        shards.resolve(f"{first}::{digits_dir}/gone.tar::{missing}", None)
    with pytest.raises(DataError, match=r"SHARDS: part 1 of 2 \(.*/gone.tar\) does not exist"):
        index.index_shards(f"{digits_dir}/gone.tar::{first}", tmp_path / "i", echo=lambda line: None)
    with pytest.raises(DataError, match=r"4 of 4 shard\(s\) of .* do not exist"):
        index.index_shards(f"{first}::{missing}", tmp_path / "i", echo=lambda line: None)


def test_first_sample_check_names_shard_expected_key_and_keys_present(indexed):
    spec = shards.resolve(str(indexed["json"]), None)
    cfg = config.DataConfig(train=str(indexed["json"]), fields={"target": "cls"})
    with pytest.raises(DataError) as info:
        stream.check_first_sample(spec, cfg)
    message = str(info.value)
    assert spec.train_urls[0] in message and "'cls'" in message and "data.fields.target" in message
    assert "the sample has: json, png" in message
    cfg = config.DataConfig(train=str(indexed["json"]), fields={"input": "jpg"})
    with pytest.raises(DataError, match=r"no input 'jpg' \(data.fields.input\); the sample has: json, png"):
        stream.check_first_sample(spec, cfg)
    # a key that decodes to another shape than the MANIFEST's: re-index
    spec.sample_shape = [1, 4, 4]
    with pytest.raises(DataError, match=r"decodes to shape \[1, 8, 8\].*re-run `pipeline data index`"):
        stream.check_first_sample(spec, config.DataConfig(train=str(indexed["json"])))


def test_a_failing_decode_function_is_named_early_and_by_policy_in_the_run(indexed, tmp_path):
    module = tmp_path / "faulty.py"
    module.write_text(
        "from pipeline.data.transforms import decode_image\n\n"
        "def always(sample):\n"
        "    raise KeyError('pixels.bin')\n\n"
        "def some(sample):\n"
        "    if sample['__key__'].endswith('7'):\n"
        "        raise ValueError('bad seven')\n"
        "    return decode_image(sample['png']), int(sample['cls'])\n"
    )
    spec = shards.resolve(str(indexed["png"]), None)
    cfg = config.DataConfig(train=str(indexed["png"]), decode=f"{module}:always")
    with pytest.raises(DataError) as info:
        stream.check_first_sample(spec, cfg)
    message = str(info.value)
    assert spec.train_urls[0] in message and "KeyError" in message and "pixels.bin" in message
    first_key = stream.first_samples(spec.train_urls[0], {}, 1)[0]["__key__"]
    assert f"'{first_key}'" in message
    with pytest.raises(config.ConfigError, match=r"'data.decode'.*has no 'nothing'"):
        stream.check_first_sample(spec, config.DataConfig(train="-", decode=f"{module}:nothing"))

    def run(on_error):
        cfg = config.DataConfig(
            train="-", batch_size=64, shuffle_buffer=0, on_error=on_error, decode=f"{module}:some"
        )
        batches = stream.TrainBatches(spec, cfg, 0, 1, seed=0)
        try:
            return [next(batches) for _ in range(4)]
        finally:
            batches.close()

    with pytest.raises(DataError, match=r"sample '\S+7' in shard \S+/train-\d+.tar: data.decode .*bad seven"):
        run("strict")
    batches = run("skip")
    bad = [b for batch in batches for b in batch.bad]
    assert len(bad) > 10 and all(b.key.endswith("7") and "bad seven" in b.reason for b in bad)
    assert all(len(batch.keys) == 64 for batch in batches)  # bad samples are counted, not batched
    assert not any(k.endswith("7") for batch in batches for k in batch.keys)


def test_decoder_is_picklable_and_works_in_loader_processes(indexed, tmp_path):
    """DataLoader processes (2 here) decode with a user decode function loaded from a file path."""
    import pickle

    module = tmp_path / "mine.py"
    module.write_text(
        "import numpy as np\n\ndef decode(sample):\n"
        "    return np.load(__import__('io').BytesIO(sample['npy'])), int(sample['cls'])\n"
    )
    spec = shards.resolve(str(indexed["npy"]), None)
    decoder = stream.Decoder(spec, None, 0, None, f"{module}:decode")
    decoder.function()
    copy = pickle.loads(pickle.dumps(decoder))
    sample = stream.first_samples(spec.train_urls[0], {}, 1)[0]
    assert (copy.decode(dict(sample))[0] == decoder.decode(dict(sample))[0]).all()
    common = dict(train="-", batch_size=32, shuffle_buffer=64, num_workers=2)
    plain = stream.TrainBatches(spec, config.DataConfig(**common), 0, 1, seed=0)
    mine = stream.TrainBatches(
        spec, config.DataConfig(**common, cache_mb=4, decode=f"{module}:decode"), 0, 1, seed=0
    )
    try:
        for _ in range(6):
            a, b = next(plain), next(mine)
            assert a.keys == b.keys and (a.x == b.x).all() and (a.y == b.y).all()
    finally:
        plain.close()
        mine.close()


def test_pipe_urls_index_with_a_pipe_root(digits_dir, tmp_path):
    out = tmp_path / "index"
    manifest = index.index_shards(
        f"pipe:cat {digits_dir}/train-{{000000..000011}}.tar",
        out,
        val=f"pipe:cat {digits_dir}/val-{{000000..000002}}.tar",
        echo=lambda line: None,
    )
    assert manifest["root"] == f"pipe:cat {digits_dir}"
    assert manifest["splits"]["train"]["shards"][0]["name"] == "train-000000.tar"
    prepared = shards.read_manifest(digits_dir)
    for split in ("train", "val"):  # the same bytes read through the pipe: the same sha256
        assert manifest["splits"][split]["shards"] == [
            {**s, "keys": ["cls", "png"]} for s in prepared["splits"][split]["shards"]
        ]
    spec = shards.resolve(str(out), None, allow_manifest_pipe=True)  # the user wrote this pipe:
    assert spec.train_urls[3] == f"pipe:cat {digits_dir}/train-000003.tar"
    stream.check_first_sample(spec, config.DataConfig(train=str(out)))


def test_manifest_names_must_stay_relative(digits_dir, tmp_path):
    for bad in ("../train-000000.tar", "/etc/passwd", "a/../../b.tar", "s3://x/y.tar"):
        out = tmp_path / f"m{abs(hash(bad))}"
        out.mkdir()
        manifest = shards.read_manifest(digits_dir)
        manifest["splits"]["train"]["shards"][0]["name"] = bad
        (out / "MANIFEST.json").write_text(json.dumps(manifest))
        with pytest.raises(DataError, match="not a plain relative path"):
            shards.read_manifest(out)


def test_shards_on_s3_index_with_a_url_root(indexed, tmp_path, s3_endpoint):
    """Shards in a bucket (moto's S3 server on 127.0.0.1), indexed into a local dir and into the bucket."""
    import s3fs

    options = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("users")
    root = shards.read_manifest(indexed["npy"])["root"]
    for name in ("train-000000.tar", "train-000001.tar", "val-000000.tar"):
        fs.put(f"{root}/{name}", f"users/npy/{name}")
    local = index.index_shards(
        "s3://users/npy/train-{000000..000001}.tar",
        tmp_path / "index",
        val="s3://users/npy/val-000000.tar",
        storage_options=options,
        echo=lambda line: None,
    )
    assert local["root"] == "s3://users/npy" and local["fields"] == {"input": "npy", "target": "cls"}
    spec = shards.resolve(str(tmp_path / "index"), None, options)
    assert spec.train_urls == ["s3://users/npy/train-000000.tar", "s3://users/npy/train-000001.tar"]
    stream.check_first_sample(spec, config.DataConfig(train="-", storage_options=options))
    assert shards.inspect_prepared(tmp_path / "index", storage_options=options) == []
    # SHARDS as a bucket prefix (its .tar files), the MANIFEST written beside them: no root
    fs.rm("users/npy/val-000000.tar")
    remote = index.index_shards(
        "s3://users/npy/", "s3://users/npy", storage_options=options, echo=lambda line: None
    )
    assert "root" not in remote and [s["name"] for s in remote["splits"]["train"]["shards"]] == [
        "train-000000.tar",
        "train-000001.tar",
    ]
    assert remote["splits"]["train"]["shards"] == local["splits"]["train"]["shards"]
    spec = shards.resolve("s3://users/npy", "s3://users/npy/train-000001.tar", options)
    assert spec.train_counts == [128, 128] and spec.val_counts == [128]
