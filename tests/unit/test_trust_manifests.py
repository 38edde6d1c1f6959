"""Names and numbers read from a MANIFEST someone else wrote (issue 16, findings 2, 6 and 8): one rule
for every name (files.confined: a plain relative path that stays inside its directory, also through
symlinks), checkpoint and data MANIFESTs that are not what they claim refused naming the file and the
entry, `pipe:` commands only from the user, and `data prepare --overwrite` replacing only a dataset."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from pipeline.checkpoint import commit
from pipeline.config import ConfigError
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
