"""Write WebDataset tar shards + MANIFEST.json, verify them, and resolve `data.train`/`data.val`.

A prepared directory:
    MANIFEST.json          format, source, classes, sample shape, normalisation, splits with
                           per-shard {name, samples, bytes, sha256}
    train-000000.tar ...   WebDataset shards: <key>.png (encoded image) + <key>.cls (label, ascii)
    val-000000.tar ...

We write tars with the standard library rather than ``webdataset.TarWriter`` so that the bytes are
reproducible (fixed mtime/uid/order): the same seed gives the same sha256, which the MANIFEST records.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ConfigError
from pipeline.data.sources import Source
from pipeline.data.transforms import encode_png
from pipeline.files import fsync_tree, sha256_file

MANIFEST = "MANIFEST.json"
FORMAT = "pipeline-shards/1"


class DataError(ConfigError):
    """Bad input data found before training starts (exit 2)."""


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def _write_split(
    out: Path, split: str, source: Source, indices: np.ndarray, samples_per_shard: int
) -> list[dict[str, Any]]:
    shards = []
    for shard_no, start in enumerate(range(0, len(indices), samples_per_shard)):
        name = f"{split}-{shard_no:06d}.tar"
        chunk = indices[start : start + samples_per_shard]
        with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in chunk:
                # The key keeps the source index, so any consumed sample can be traced to its origin.
                key = f"{source.name}-{int(i):06d}"
                _add_member(tar, f"{key}.png", encode_png(source.images[i]))
                _add_member(tar, f"{key}.cls", str(int(source.labels[i])).encode())
        path = out / name
        shards.append(
            {"name": name, "samples": len(chunk), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        )
    return shards


def _split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: each class contributes val_fraction of its samples to val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = round(len(members) * val_fraction)
        val.append(members[:n_val])
        train.append(members[n_val:])
    # Shuffle across classes so each shard holds a mix (the stream only shuffles within a buffer).
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))


def write_prepared(
    source: Source, out: Path, *, samples_per_shard: int, val_fraction: float, seed: int, overwrite: bool
) -> dict[str, Any]:
    """Write shards and MANIFEST into `out`, atomically: a temp dir renamed into place at the end."""
    if samples_per_shard <= 0:
        raise ConfigError("--samples-per-shard must be > 0")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError("--val-fraction must be in [0, 1)")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} exists and is not empty; choose another dir or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        train_idx, val_idx = _split_indices(source.labels, val_fraction, seed)
        pixels = source.images.astype(np.float64) / 255.0
        channel_axes = (0, 1, 2) if pixels.ndim == 4 else None
        mean = pixels.mean(axis=channel_axes) if channel_axes else np.array([pixels.mean()])
        std = pixels.std(axis=channel_axes) if channel_axes else np.array([pixels.std()])
        height, width = source.images.shape[1:3]
        channels = source.images.shape[3] if source.images.ndim == 4 else 1
        manifest = {
            "format": FORMAT,
            "source": source.name,
            "seed": seed,
            "val_fraction": val_fraction,
            "classes": source.classes,
            "num_classes": len(source.classes),
            "sample_shape": [int(channels), int(height), int(width)],
            "normalize": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]},
            "splits": {},
        }
        for split, idx in (("train", train_idx), ("val", val_idx)):
            shards = _write_split(tmp, split, source, idx, samples_per_shard)
            manifest["splits"][split] = {"samples": len(idx), "shards": shards}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        fsync_tree(tmp)  # the payload is durable before the rename makes it visible
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{directory} has no {MANIFEST}: write it with `pipeline data prepare`") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run `pipeline data prepare`") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def _count_tar_samples(path: Path) -> int:
    keys = set()
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if member.isfile():
                keys.add(member.name.split("/")[-1].split(".", 1)[0])
    return len(keys)


def inspect_prepared(directory: Path, verify: bool = True) -> list[str]:
    """Check every shard against the MANIFEST (size, sha256, sample count). Returns the problems."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = []
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            path = directory / shard["name"]
            if not path.is_file():
                problems.append(f"{split}: shard {path} is missing")
                continue
            if path.stat().st_size != shard["bytes"]:
                problems.append(
                    f"{split}: shard {path} has {path.stat().st_size} bytes, MANIFEST says {shard['bytes']}"
                )
                continue
            if verify and sha256_file(path) != shard["sha256"]:
                problems.append(f"{split}: shard {path} sha256 differs from the MANIFEST (corrupt?)")
                continue
            if verify:
                try:
                    n = _count_tar_samples(path)
                except tarfile.TarError as e:
                    problems.append(f"{split}: shard {path} is not a readable tar: {e}")
                    continue
                if n != shard["samples"]:
                    problems.append(
                        f"{split}: shard {path} holds {n} samples, MANIFEST says {shard['samples']}"
                    )
    return problems


@dataclass
class DataSpec:
    """What the workers need to know about the data, resolved once before launch."""

    train_urls: list[str]
    val_urls: list[str]
    train_samples: int | None  # None when shard URLs come without a MANIFEST
    val_samples: int | None
    sample_shape: list[int]
    num_classes: int
    mean: list[float]
    std: list[float]
    classes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        return cls(**d)


def _has_scheme(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_urls(pattern: str, key: str) -> list[str]:
    """Brace-expand a shard pattern and check local files exist (remote URLs are checked when read)."""
    import braceexpand  # a webdataset dependency

    urls = []
    for part in pattern.split("::"):  # webdataset's separator for several patterns
        urls.extend(braceexpand.braceexpand(part.strip()))
    if not urls:
        raise DataError(f"config key '{key}': '{pattern}' names no shards")
    missing = [u for u in urls if not _has_scheme(u) and not Path(u).is_file()]
    if missing:
        raise DataError(
            f"config key '{key}': {len(missing)} of {len(urls)} shard(s) not found, first: {missing[0]}. "
            "Prepare data with `pipeline data prepare SOURCE --out DIR` and point the key at DIR."
        )
    return urls


def _split_urls(directory: Path, manifest: dict[str, Any], split: str, key: str) -> tuple[list[str], int]:
    if split not in manifest["splits"]:
        raise DataError(f"config key '{key}': {directory}/{MANIFEST} has no '{split}' split")
    info = manifest["splits"][split]
    urls = [str(directory / s["name"]) for s in info["shards"]]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise DataError(
            f"config key '{key}': shard {missing[0]} listed in {directory}/{MANIFEST} is missing; "
            "re-run `pipeline data prepare`"
        )
    return urls, int(info["samples"])


def resolve(train: str, val: str | None) -> DataSpec:
    """Turn `data.train` / `data.val` into shard lists + shapes. Raises DataError naming the key."""
    train_path = Path(train)
    if not _has_scheme(train) and train_path.is_dir():
        manifest = read_manifest(train_path)
        train_urls, train_n = _split_urls(train_path, manifest, "train", "data.train")
        if val is None:
            val_urls, val_n = _split_urls(train_path, manifest, "val", "data.train")
        elif Path(val).is_dir():
            val_urls, val_n = _split_urls(Path(val), read_manifest(Path(val)), "val", "data.val")
        else:
            val_urls, val_n = expand_urls(val, "data.val"), None
        return DataSpec(
            train_urls=train_urls,
            val_urls=val_urls,
            train_samples=train_n,
            val_samples=val_n,
            sample_shape=manifest["sample_shape"],
            num_classes=manifest["num_classes"],
            mean=manifest["normalize"]["mean"],
            std=manifest["normalize"]["std"],
            classes=manifest["classes"],
        )
    if not _has_scheme(train) and not any(c in train for c in "{}") and not train_path.exists():
        raise DataError(
            f"config key 'data.train': {train} does not exist. Prepare data with "
            "`pipeline data prepare SOURCE --out DIR` and set data.train=DIR"
        )
    # Raw shard URLs: the MANIFEST next to the first local shard, if any, gives shapes and classes.
    train_urls = expand_urls(train, "data.train")
    first = Path(train_urls[0])
    if _has_scheme(train_urls[0]) or not (first.parent / MANIFEST).is_file():
        raise DataError(
            "config key 'data.train': shard URLs without a MANIFEST.json beside them are not supported yet; "
            "point data.train at a directory written by `pipeline data prepare`"
        )
    manifest = read_manifest(first.parent)
    if val is None:
        raise DataError("config key 'data.val' is required when data.train lists shard URLs")
    val_urls = expand_urls(val, "data.val")
    return DataSpec(
        train_urls=train_urls,
        val_urls=val_urls,
        train_samples=None,
        val_samples=None,
        sample_shape=manifest["sample_shape"],
        num_classes=manifest["num_classes"],
        mean=manifest["normalize"]["mean"],
        std=manifest["normalize"]["std"],
        classes=manifest["classes"],
    )
