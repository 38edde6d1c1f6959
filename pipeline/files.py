"""File helpers shared by the data and checkpoint layers: hashing and durable writes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable (the entry lives in the directory inode)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path, skip: set[Path] | frozenset[Path] = frozenset()) -> None:
    """fsync every file under root (but those in `skip`, already synced), then every directory, so a
    later rename commits complete data."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and path not in skip:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for directory in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        fsync_dir(directory)
