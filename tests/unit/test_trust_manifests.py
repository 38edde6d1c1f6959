"""Names and numbers read from a MANIFEST someone else wrote (issue 16, findings 2, 6 and 8): one rule
for every name (files.confined: a plain relative path that stays inside its directory, also through
symlinks), checkpoint and data MANIFESTs that are not what they claim refused naming the file and the
entry, `pipe:` commands only from the user, and `data prepare --overwrite` replacing only a dataset."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.checkpoint import commit
from pipeline.config import ConfigError
from pipeline.data import shards, sources
from pipeline.data.shards import DataError
from pipeline.files import confined, unplain

# --- the rule --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "a/b.tar", "engines/model/state.pt", "x..y", "train-000000.tar", ".a"])
def test_plain_relative_names_pass(name):
    assert unplain(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "a/../../b",
        "a/..",
        "/etc/passwd",
        "~/x",
        "a\\..\\b",
        "C:x",
        "s3://bucket/x",
        "pipe:cat x",
        "a//b",
        "./a",
        "a/.",
        "a/",
        "",
        None,
        3,
        "a\x00b",
        "a\nb",
    ],
)
def test_names_that_could_leave_their_directory_are_not_plain(name):
    assert unplain(name) is not None


def test_confined_follows_symlinks(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "out").symlink_to(outside)
    (root / "in").symlink_to(root / "sub")
    assert confined(root, "in/x", where="M") == root / "in" / "x"  # a link that stays inside is fine
    with pytest.raises(ConfigError, match=r"M: entry 'out/x' .*symlink leading outside"):
        confined(root, "out/x", where="M")
    with pytest.raises(
        ConfigError, match=r"M: entry '\.\./x' is not a plain relative path .*'\.\.' component"
    ):
        confined(root, "../x", where="M")


# --- checkpoint MANIFESTs --------------------------------------------------------------------------------


def write_commit(ckpt: Path, files: dict[str, bytes], **extra) -> None:
    """A commit dir whose MANIFEST lists `files` (name -> bytes, as it would hash them) and `extra` keys."""
    ckpt.mkdir(parents=True, exist_ok=True)
    table = {rel: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for rel, b in files.items()}
    manifest = {"format": commit.FORMAT, "step": 7, "files": table, **extra}
    (ckpt / commit.MANIFEST).write_text(json.dumps(manifest))


def test_verify_refuses_a_local_manifest_naming_a_file_outside_the_commit(tmp_path):
    secret = tmp_path / "outside.bin"
    secret.write_bytes(b"not part of any checkpoint")
    ckpt = tmp_path / "ckpts" / "step_00000007"
    write_commit(ckpt, {"../../outside.bin": secret.read_bytes()})  # sizes and hashes match
    with pytest.raises(
        commit.CheckpointError, match=rf"{ckpt / commit.MANIFEST}: entry '\.\./\.\./outside\.bin'"
    ):
        commit.verify(ckpt)
    write_commit(ckpt, {str(secret): secret.read_bytes()})
    with pytest.raises(commit.CheckpointError, match="absolute path"):
        commit.verify(ckpt)


def test_verify_refuses_a_file_that_is_a_symlink_out_of_the_commit(tmp_path):
    secret = tmp_path / "outside.bin"
    secret.write_bytes(b"not part of any checkpoint")
    ckpt = tmp_path / "step_00000007"
    write_commit(ckpt, {"trainer_state.json": secret.read_bytes()})
    (ckpt / "trainer_state.json").symlink_to(secret)
    with pytest.raises(commit.CheckpointError, match="'trainer_state.json' .*symlink leading outside"):
        commit.verify(ckpt)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[1, 2]", "unknown format 'list'"),
        ("\xff\xfe", "not valid JSON"),
        (json.dumps({"format": commit.FORMAT, "files": {}}), "'step' must be a step number"),
        (json.dumps({"format": commit.FORMAT, "step": 1}), "'files' must be an object"),
        (json.dumps({"format": commit.FORMAT, "step": 1, "files": {"a": 3}}), "entry 'a' needs 'bytes'"),
        (
            json.dumps({"format": commit.FORMAT, "step": 1, "files": {}, "engine_tag": "../../../etc"}),
            "entry '../../../etc' is not a plain relative path",
        ),
        (
            json.dumps({"format": commit.FORMAT, "step": 1, "files": {}, "engines": ["model/x"]}),
            "engine or tag name 'model/x' must be one path component",
        ),
    ],
)
def test_a_checkpoint_manifest_that_is_not_ours_is_refused_naming_it(tmp_path, text, match):
    (tmp_path / commit.MANIFEST).write_bytes(text.encode("latin-1"))
    with pytest.raises(commit.CheckpointError, match=match) as caught:
        commit.read_manifest(tmp_path)
    assert str(tmp_path / commit.MANIFEST) in str(caught.value)


def test_resume_auto_passes_over_a_local_traversal_commit_to_the_previous_one(tmp_path):
    from pipeline.checkpoint.store import Store

    root = tmp_path / "checkpoints"
    good = root / "step_00000001"
    write_commit(good, {"trainer_state.json": b"{}"})
    (good / "trainer_state.json").write_bytes(b"{}")
    (tmp_path / "secret").write_bytes(b"s")
    write_commit(root / "step_00000002", {"../../secret": b"s"})  # newer, and it verifies by its hashes
    warnings: list[str] = []
    assert Store(root).newest_verified(warn=warnings.append) == good
    assert len(warnings) == 1 and "step_00000002" in warnings[0] and "'../../secret'" in warnings[0]


def test_our_own_commits_still_verify(tmp_path):
    ckpt = tmp_path / "step_00000007"
    (ckpt / "engines" / "model" / "state").mkdir(parents=True)
    payload = {"engines/model/state/mp_rank_00_model_states.pt": b"w" * 64, "trainer_state.json": b"{}"}
    for rel, data in payload.items():
        (ckpt / rel).write_bytes(data)
    write_commit(ckpt, payload, engines=["model"], engine_tag="state")
    assert commit.verify(ckpt)["step"] == 7
    os.remove(ckpt / "trainer_state.json")
    with pytest.raises(commit.CheckpointError, match="trainer_state.json is missing"):
        commit.verify(ckpt)


# --- data MANIFESTs --------------------------------------------------------------------------------------


def cli(*args: str) -> tuple[int, str]:
    """The CLI in this process: (exit code, stderr)."""
    from typer.testing import CliRunner

    from pipeline.__main__ import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stderr


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A tiny prepared dataset: 48 8x8 JPEGs, 6 train shards + val shards (copied per test to damage)."""
    out = tmp_path_factory.mktemp("small") / "data"
    shards.write_prepared(sources.synthetic_images("48", "8x8"), out, samples_per_shard=6, val_fraction=0.25)
    return out


@pytest.fixture
def data(small, tmp_path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(small, copy)
    return copy


def edit_manifest(directory: Path, change) -> None:
    manifest = json.loads((directory / shards.MANIFEST).read_text())
    change(manifest)
    (directory / shards.MANIFEST).write_text(json.dumps(manifest))


def test_a_shard_symlinked_out_of_the_dataset_is_refused(data, tmp_path):
    outside = tmp_path / "outside.tar"
    shutil.move(data / "train-000001.tar", outside)  # the right bytes, so only the place is wrong
    (data / "train-000001.tar").symlink_to(outside)
    with pytest.raises(DataError, match=r"MANIFEST.json: entry 'train-000001.tar' .*symlink leading outside"):
        shards.resolve(str(data), None)
    with pytest.raises(DataError, match="symlink leading outside"):
        shards.inspect_prepared(data)


def test_a_pipe_root_in_a_manifest_never_runs_unless_the_user_allows_it(data, tmp_path):
    marker = tmp_path / "ran"  # what the "command" would leave behind: the test asserts it never appears
    edit_manifest(data, lambda m: m.update(root=f"pipe:touch {marker}; cat {data}", root_suffix=""))
    with pytest.raises(DataError, match=r"shell command .*data\.allow_manifest_pipe=true"):
        shards.resolve(str(data), None)
    with pytest.raises(DataError, match="--allow-manifest-pipe"):
        shards.inspect_prepared(data)
    code, err = cli("data", "inspect", str(data))
    assert code == 2 and "shell command" in err
    assert not marker.exists()
    assert cli("data", "inspect", str(data), "--no-verify")[0] == 0  # reading the MANIFEST runs nothing
    spec = shards.resolve(str(data), None, allow_manifest_pipe=True)  # the user said so
    assert spec.train_urls[0] == f"pipe:touch {marker}; cat {data}/train-000000.tar" and not marker.exists()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.pop("splits"), "lacks the 'splits' section"),
        (lambda m: m.pop("sample_shape"), "lacks the 'sample_shape' section"),
        (lambda m: m.pop("normalize"), "lacks the 'normalize' section"),
        (lambda m: m.update(splits=[1]), "'splits' must be a dict"),
        (lambda m: m.update(num_classes=3), "'num_classes' is 3 but 'classes' names 10"),
        (lambda m: m.update(sample_shape=[3, 0, 8]), "'sample_shape' must be a list of sizes > 0"),
        (lambda m: m["normalize"].update(std=[0.0, 1.0, 1.0]), "std numbers > 0"),
        (lambda m: m["splits"]["train"].update(shards={}), "split 'train' must be an object with a 'shards'"),
        (lambda m: m["splits"]["train"]["shards"][0].update(samples="6"), "declares '6' samples"),
        (lambda m: m.update(root_suffix=" -"), "'root_suffix' belongs to a `pipe:` root"),
    ],
)
def test_a_data_manifest_lacking_a_section_exits_2_naming_it(data, change, match):
    edit_manifest(data, change)
    with pytest.raises(DataError, match=match) as caught:
        shards.resolve(str(data), None)
    assert str(data / shards.MANIFEST) in str(caught.value)
    code, err = cli("data", "inspect", str(data), "--no-verify")
    assert code == 2 and "error:" in err and match.split("'")[0] in err


@pytest.mark.parametrize("text", [b"[]", b'"pipeline-shards/1"', "\xff{".encode("latin-1")])
def test_a_data_manifest_that_is_not_a_json_object_exits_2(data, text):
    (data / shards.MANIFEST).write_bytes(text)
    with pytest.raises(DataError, match=rf"{data / shards.MANIFEST}.*(unknown format|not UTF-8)"):
        shards.resolve(str(data), None)


def test_zero_train_samples_are_refused_before_the_loader_waits_forever(data):
    def no_samples(manifest):
        for shard in manifest["splits"]["train"]["shards"]:
            shard["samples"] = 0

    edit_manifest(data, no_samples)
    with pytest.raises(DataError, match=r"shard 'train-000000.tar' declares 0 samples \(must be >= 1\)"):
        shards.resolve(str(data), None)
    edit_manifest(data, lambda m: m["splits"]["train"].update(shards=[], samples=0))
    with pytest.raises(DataError, match="declares no train samples"):
        shards.resolve(str(data), None)


@pytest.mark.parametrize("keep", [0, 100])
def test_an_empty_or_short_shard_is_found_at_start(data, keep, capsys):
    shard = data / "train-000002.tar"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:keep])
    with pytest.raises(
        DataError, match=rf"data\.train.*train-000002.tar has {keep} bytes, its MANIFEST.json says {size}"
    ):
        shards.resolve(str(data), None)
    shards.resolve(str(data), None, missing_ok=True)  # data.on_error=skip: warned, its samples skipped
    assert "train-000002.tar has" in capsys.readouterr().out


# --- data prepare: dotted names, --overwrite -------------------------------------------------------------


def write_png(path: Path, value: int) -> None:
    from pipeline.data.transforms import encode_png

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(np.full((8, 8), value, dtype=np.uint8)))


def samples_as_read(directory: Path) -> list[int]:
    """Samples per shard as training groups them (webdataset), for every shard of the MANIFEST."""
    from pipeline.data import index

    manifest = shards.read_manifest(directory)
    return [
        index.scan_shard(str(directory / s["name"]), {}).samples
        for info in manifest["splits"].values()
        for s in info["shards"]
    ]


def test_dots_in_source_names_keep_every_sample(tmp_path):
    folder = tmp_path / "my.photos.v2"
    for i in range(12):
        write_png(folder / ("cat.s" if i % 2 else "dog.s") / f"img.{i}.final.png", 10 * i)
    np.savez(tmp_path / "scans.v2.npz", x=np.zeros((12, 8, 8), np.uint8), y=np.arange(12) % 2)
    for source in (f"imagefolder:{folder}", f"npz:{tmp_path / 'scans.v2.npz'}"):
        out = tmp_path / f"out-{source.split(':')[0]}"
        code, err = cli("data", "prepare", source, "--out", str(out), "--samples-per-shard", "4")
        assert code == 0, err
        manifest = shards.read_manifest(out)
        declared = [s["samples"] for info in manifest["splits"].values() for s in info["shards"]]
        assert samples_as_read(out) == declared and sum(declared) == 12
        assert shards.inspect_prepared(out) == []


def test_overwrite_replaces_only_a_prepared_dataset_or_an_empty_dir(data, tmp_path):
    source = sources.synthetic_images("12", "8x8")
    home = tmp_path / "home"
    (home / "thesis").mkdir(parents=True)
    (home / "thesis" / "chapter1.tex").write_text("years of work")
    code, err = cli("data", "prepare", "synthetic-images:12:8x8", "--out", str(home), "--overwrite")
    assert code == 2 and str(home) in err and "not a dataset `pipeline data prepare` wrote" in err
    assert (home / "thesis" / "chapter1.tex").read_text() == "years of work"

    (data / "notes.txt").write_text("mine")  # a prepared dataset someone added a file to
    with pytest.raises(ConfigError, match=r"holds files `prepare` did not write \(notes.txt\)"):
        shards.write_prepared(source, data, overwrite=True)
    (data / "notes.txt").unlink()
    edit_manifest(data, lambda m: m.update(format=shards.FORMAT_INDEXED))  # the user's own shards
    with pytest.raises(ConfigError, match="indexes shards of yours"):
        shards.write_prepared(source, data, overwrite=True)
    assert (tmp_path / "data" / "train-000000.tar").is_file()

    edit_manifest(data, lambda m: m.update(format=shards.FORMAT))
    assert shards.write_prepared(source, data, overwrite=True, samples_per_shard=3)["source"] == source.name
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no .old left
    (tmp_path / "empty").mkdir()
    shards.write_prepared(source, tmp_path / "empty", overwrite=True)
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        shards.write_prepared(source, file, overwrite=True)
    (tmp_path / "link").symlink_to(data)
    with pytest.raises(ConfigError, match="is a symlink; give the directory it points to"):
        shards.write_prepared(source, tmp_path / "link", overwrite=True)


def test_shards_symlinked_into_a_dir_are_indexed_where_they_live(small, tmp_path):
    from pipeline.data import index

    links = tmp_path / "links"
    links.mkdir()
    for shard in sorted(small.glob("*.tar")):
        (links / shard.name).symlink_to(shard)
    manifest = index.index_shards(str(links), links, val_fraction=0.2, echo=lambda line: None)
    assert manifest["root"] == str(small.resolve())  # not the links' dir: names stay inside their root
    spec = shards.resolve(str(links), None)
    assert all(url.startswith(str(small.resolve())) for url in spec.train_urls)
