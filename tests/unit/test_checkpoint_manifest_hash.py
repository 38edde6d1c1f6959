"""The MANIFEST's content hashes: new commits record xxh3_128 (hashed while writing), corruption is
caught naming the file, commits from before issue 19 (sha256) still verify, no known hash is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import commit
from pipeline.checkpoint.writer import HASH, BackgroundWriter
from pipeline.files import sha256_file, xxh3_128_file

ENGINE_FILE = f"engines/model/{commit.ENGINE_TAG}/weights.pt"


class Engine:
    """Stands for engine.py's engine: hands its state dict to the background writer, as DeepSpeed's
    checkpoint engine hook does."""

    name = "model"

    def __init__(self, extra_file: str | None = None) -> None:
        self.extra_file = extra_file

    def save(self, directory: Path, tag: str, writer: BackgroundWriter) -> None:
        (directory / tag).mkdir(parents=True)
        writer.submit(
            {"w": torch.arange(100_000, dtype=torch.float32), "step": 3}, directory / tag / "weights.pt"
        )
        (directory / "latest").write_text(tag)  # as DeepSpeed does on rank 0: sealed in the background
        if self.extra_file:  # a file of DeepSpeed's we do not know: hashed and fsynced by the commit
            (directory / tag / self.extra_file).write_text("metadata")


def commit_one(root: Path, engine: Engine) -> Path:
    """A checkpoint committed by the real protocol (one process: agreement and gather are trivial)."""
    writer = BackgroundWriter()
    try:
        pending = commit.start(
            [engine],
            {"step": 3},
            root,
            3,
            is_rank0=True,
            all_ok=lambda ok: ok,
            writer=writer,
            metadata={},
        )
        return commit.finish(
            pending, is_rank0=True, all_ok=lambda ok: ok, gather=lambda o: [o], writer=writer, retention=None
        )
    finally:
        writer.close()


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return commit_one(tmp_path, Engine())


def rewrite_manifest(ckpt: Path, entry_of) -> None:
    manifest = json.loads((ckpt / commit.MANIFEST).read_text())
    manifest["files"] = {rel: entry_of(ckpt / rel, entry) for rel, entry in manifest["files"].items()}
    (ckpt / commit.MANIFEST).write_text(json.dumps(manifest))


def flip_a_byte(path: Path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_new_manifests_carry_xxh3_128_of_every_file_and_verify(ckpt):
    files = commit.verify(ckpt)["files"]
    assert HASH == "xxh3_128"
    assert set(files) == {ENGINE_FILE, commit.STATE_FILE, "engines/model/latest"}
    for rel, entry in files.items():  # the engine file hashed while written, the small ones sealed
        assert entry == {"bytes": (ckpt / rel).stat().st_size, "xxh3_128": xxh3_128_file(ckpt / rel)}
    assert torch.equal(torch.load(ckpt / ENGINE_FILE)["w"], torch.arange(100_000, dtype=torch.float32))


def test_a_file_neither_written_nor_sealed_by_the_writer_is_hashed_by_the_commit(tmp_path):
    ckpt = commit_one(tmp_path, Engine(extra_file="unknown.json"))
    files = commit.verify(ckpt)["files"]
    rel = f"engines/model/{commit.ENGINE_TAG}/unknown.json"
    assert files[rel] == {"bytes": 8, "xxh3_128": xxh3_128_file(ckpt / rel)}


@pytest.mark.parametrize("rel", [ENGINE_FILE, commit.STATE_FILE])
def test_a_flipped_byte_is_refused_naming_the_file(ckpt, rel):
    flip_a_byte(ckpt / rel, at=-100 if rel == ENGINE_FILE else 2)  # the size stays right
    with pytest.raises(commit.CheckpointError, match=f"file {rel} does not match its xxh3_128"):
        commit.verify(ckpt)


def test_an_old_sha256_manifest_still_verifies_and_catches_corruption(ckpt):
    rewrite_manifest(ckpt, lambda path, entry: {"bytes": entry["bytes"], "sha256": sha256_file(path)})
    assert all(set(e) == {"bytes", "sha256"} for e in commit.verify(ckpt)["files"].values())
    flip_a_byte(ckpt / ENGINE_FILE)
    with pytest.raises(commit.CheckpointError, match=f"file {ENGINE_FILE} does not match its sha256"):
        commit.verify(ckpt)


def test_an_entry_with_both_hashes_must_match_both(ckpt):
    rewrite_manifest(ckpt, lambda path, entry: {**entry, "sha256": "0" * 64})
    with pytest.raises(commit.CheckpointError, match="does not match its sha256"):
        commit.verify(ckpt)


@pytest.mark.parametrize(
    "entry_of",
    [
        lambda path, entry: {"bytes": entry["bytes"]},
        lambda path, entry: {"bytes": entry["bytes"], "md5": "d41d8cd98f00b204e9800998ecf8427e"},
        lambda path, entry: {"bytes": entry["bytes"], "xxh3_128": None},
    ],
    ids=["no hash", "unknown hash", "not a string"],
)
def test_an_entry_without_a_known_hash_is_refused_naming_the_file(ckpt, entry_of):
    rewrite_manifest(ckpt, entry_of)
    with pytest.raises(commit.CheckpointError, match=r"file '.+' has no known content hash"):
        commit.read_manifest(ckpt)
    with pytest.raises(commit.CheckpointError, match="no known content hash"):
        commit.verify(ckpt)
