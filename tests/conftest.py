"""Shared fixtures: real data written into tmp dirs, and an environment that keeps tests on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never talk to W&B unless they ask for offline mode; Ray keeps its hands off the network.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real 1,797 sklearn digits as shards: 12 train + 3 val shards of 128 samples."""
    from pipeline.data import shards, sources

    out = tmp_path_factory.mktemp("data") / "digits"
    shards.write_prepared(
        sources.digits(), out, samples_per_shard=128, val_fraction=0.2, seed=0, overwrite=False
    )
    return out
