"""Shared fixtures: real data written into tmp dirs, and an environment that keeps tests on loopback."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from pipeline.data import shards, sources
from pipeline.net import free_port
from tests.helpers import first_key, rewrite_member

# Tests never talk to W&B unless they ask for offline mode; Ray keeps its hands off the network.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


@pytest.fixture(autouse=True)
def _no_recorded_credentials(monkeypatch):
    """Credentials a test's config recorded in this process (pipeline.secrets) end with the test."""
    monkeypatch.delenv("PIPELINE_SECRETS", raising=False)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real 1,797 sklearn digits as shards: 12 train + 3 val shards of 128 samples."""
    out = tmp_path_factory.mktemp("data") / "digits"
    shards.write_prepared(
        sources.digits(), out, samples_per_shard=128, val_fraction=0.2, seed=0, overwrite=False
    )
    return out


def stdlib_text(characters: int) -> str:
    """The first `characters` of the real English text `pipeline data prepare text-stdlib` reads."""
    from pipeline.data import text

    return text.load_text_source(text.TEXT_STDLIB).data.decode("utf-8")[:characters]


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24,000 characters of the stdlib's English text as token shards: windows of 32 (+1), 32 per shard
    (22 train shards, 3 val shards), a char vocabulary."""
    from pipeline.data import text

    root = tmp_path_factory.mktemp("text")
    (root / "doc.txt").write_text(stdlib_text(24_000), encoding="utf-8")
    out = root / "shards"
    text.write_text_prepared(
        text.load_text_source(f"text:{root / 'doc.txt'}"), out, seq_len=32, samples_per_shard=32
    )
    return out


@pytest.fixture
def corrupt_digits(tmp_path):
    """Digits in 12 shards with one of each kind of damage in shards 0-3; returns (dir, expected bad)."""
    out = tmp_path / "digits"
    shards.write_prepared(
        sources.digits(), out, samples_per_shard=120, val_fraction=0.2, seed=0, overwrite=False
    )
    names = [s["name"] for s in shards.read_manifest(out)["splits"]["train"]["shards"]]
    garbage_key = first_key(out / names[0], 5)
    rewrite_member(out / names[0], garbage_key, "png", b"\x89PNG garbage")
    unlabeled_key = first_key(out / names[1], 7)
    rewrite_member(out / names[1], unlabeled_key, "cls", None)
    # truncate shard 2 in the middle of sample #50's image: samples 0-49 stay readable
    with tarfile.open(out / names[2]) as tar:
        cut = next(m for m in tar if m.name == f"{first_key(out / names[2], 50)}.png").offset_data + 10
    data = (out / names[2]).read_bytes()
    (out / names[2]).write_bytes(data[:cut])
    (out / names[3]).unlink()
    expected = {
        "garbage": (names[0], garbage_key),
        "unlabeled": (names[1], unlabeled_key),
        "truncated_lost": 120 - 50,
        "missing": 120,
    }
    return out, names, expected


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto's server) on 127.0.0.1; credentials key=testing, secret=testing."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
