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
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ConfigError
from pipeline.data.sources import Source
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
    out: Path,
    split: str,
    source: Source,
    indices: np.ndarray,
    samples_per_shard: int,
    shard_bytes: int,
    label_of: dict[int, int],
) -> list[dict[str, Any]]:
    """Shards of at most `samples_per_shard` samples and (if > 0) about `shard_bytes` bytes each."""
    shards: list[dict[str, Any]] = []
    position = 0
    while position < len(indices):
        name = f"{split}-{len(shards):06d}.tar"
        count = 0
        with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            while position < len(indices) and count < samples_per_shard:
                i = int(indices[position])
                # The key keeps the source index, so any consumed sample can be traced to its origin.
                key = f"{source.name}-{i:06d}"
                ext, payload = source.payload(i)
                _add_member(tar, f"{key}.{ext}", payload)
                _add_member(tar, f"{key}.cls", str(label_of[int(source.labels[i])]).encode())
                position, count = position + 1, count + 1
                if shard_bytes and tar.offset >= shard_bytes:
                    break
        path = out / name
        shards.append(
            {"name": name, "samples": count, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        )
    return shards


def _split_indices(
    labels: np.ndarray, val_fraction: float, seed: int, classes: list[int] | None, train_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: each class contributes val_fraction of its samples to val, and
    train_fraction of the rest to train (fewer labels, e.g. for fine-tuning experiments)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in classes if classes is not None else np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = round(len(members) * val_fraction)
        val.append(members[:n_val])
        rest = members[n_val:]
        train.append(rest[: max(1, round(len(rest) * train_fraction))])
    # Shuffle across classes so each shard holds a mix (the stream only shuffles within a buffer).
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))


def write_prepared(
    source: Source,
    out: Path,
    *,
    samples_per_shard: int = 128,
    shard_size_mb: float = 0.0,
    val_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
    classes: list[int] | None = None,
    train_fraction: float = 1.0,
) -> dict[str, Any]:
    """Write shards and MANIFEST into `out`, atomically: a temp dir renamed into place at the end.
    `classes` keeps only those labels (relabelled 0..k-1 in that order); `train_fraction` keeps that
    fraction of each class's train samples."""
    if classes is not None and (not classes or any(c not in range(len(source.classes)) for c in classes)):
        raise ConfigError(f"--classes {classes}: labels must be in 0..{len(source.classes) - 1}")
    if not 0.0 < train_fraction <= 1.0:
        raise ConfigError("--train-fraction must be in (0, 1]")
    if samples_per_shard <= 0:
        raise ConfigError("--samples-per-shard must be > 0")
    if shard_size_mb < 0:
        raise ConfigError("--shard-size-mb must be >= 0")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError("--val-fraction must be in [0, 1)")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} exists and is not empty; choose another dir or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        train_idx, val_idx = _split_indices(source.labels, val_fraction, seed, classes, train_fraction)
        kept = classes if classes is not None else list(range(len(source.classes)))
        label_of = {c: i for i, c in enumerate(kept)}
        class_names = [source.classes[c] for c in kept]
        mean, std = source.stats()
        manifest = {
            "format": FORMAT,
            "source": source.name,
            "seed": seed,
            "val_fraction": val_fraction,
            "classes": class_names,
            "num_classes": len(class_names),
            "class_map": {name: i for i, name in enumerate(class_names)},
            "train_fraction": train_fraction,
            "kind": source.kind,
            "channels": source.channels(),
            "sample_shape": source.sample_shape(),  # None: sizes differ, training needs data.image_size
            "normalize": {"mean": mean, "std": std},
            "splits": {},
        }
        for split, idx in (("train", train_idx), ("val", val_idx)):
            shards = _write_split(
                tmp, split, source, idx, samples_per_shard, int(shard_size_mb * 1e6), label_of
            )
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


def is_remote(location: str | Path) -> bool:
    text = str(location)
    return ("://" in text and not text.startswith("file://")) or text.startswith("pipe:")


def read_manifest(directory: str | Path, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The MANIFEST of a prepared directory: a local path or an fsspec URL (s3://bucket/prefix)."""
    location = str(directory).rstrip("/")
    path = f"{location}/{MANIFEST}"
    try:
        if is_remote(location):
            import fsspec  # only for object stores

            with fsspec.open(path, "rt", **(storage_options or {})) as f:
                text = f.read()
        else:
            text = Path(path.removeprefix("file://")).read_text()
    except FileNotFoundError:
        raise DataError(f"{directory} has no {MANIFEST}: write it with `pipeline data prepare`") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    try:
        manifest = json.loads(text)
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
    train_samples: int
    val_samples: int
    train_counts: list[int]  # declared samples per shard (MANIFEST): the data cursor plans with them
    val_counts: list[int]
    sample_shape: list[int]  # what the model sees: (C, H, W), or the sequence shape
    num_classes: int
    mean: list[float]
    std: list[float]
    classes: list[str] = field(default_factory=list)
    kind: str = "image"  # "image" | "sequence"
    image_size: list[int] | None = None  # resize every image to (H, W) when decoding

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        return cls(**d)


def expand_urls(pattern: str, key: str) -> list[str]:
    """Brace-expand a shard pattern (`dir/train-{000000..000011}.tar`; `::` joins several)."""
    import braceexpand  # a webdataset dependency

    urls = [u for part in pattern.split("::") for u in braceexpand.braceexpand(part.strip())]
    if not urls:
        raise DataError(f"config key '{key}': '{pattern}' names no shards")
    return urls


def _check_local(urls: list[str], key: str, missing_ok: bool) -> None:
    missing = [u for u in urls if not is_remote(u) and not Path(u.removeprefix("file://")).is_file()]
    if not missing:
        return
    message = f"config key '{key}': {len(missing)} of {len(urls)} shard(s) not found, first: {missing[0]}"
    if not missing_ok:
        raise DataError(
            f"{message}. Prepare data with `pipeline data prepare SOURCE --out DIR` and point the key at DIR "
            "(or set data.on_error=skip to train without them)"
        )
    print(f"warning: {message}; data.on_error=skip: their samples will be skipped and counted")


def _is_directory(location: str) -> bool:
    if is_remote(location):
        return not any(c in location for c in "{}") and not location.endswith((".tar", ".tgz", ".tar.gz"))
    return Path(location.removeprefix("file://")).is_dir()


@dataclass
class _Split:
    urls: list[str]
    counts: list[int]
    samples: int


def _from_directory(
    location: str, split: str, key: str, storage_options: dict[str, Any]
) -> tuple[_Split, dict]:
    manifest = read_manifest(location, storage_options)
    if split not in manifest["splits"]:
        raise DataError(f"config key '{key}': {location}/{MANIFEST} has no '{split}' split")
    shard_list = manifest["splits"][split]["shards"]
    urls = [f"{location.rstrip('/')}/{s['name']}" for s in shard_list]
    counts = [int(s["samples"]) for s in shard_list]
    return _Split(urls, counts, sum(counts)), manifest


_SHARD_IN_URL = re.compile(r"(\S+)/([\w.-]+\.(?:tar|tgz|tar\.gz))(?:\s|$)")


def _dir_and_name(url: str) -> tuple[str, str]:
    """Where a shard's MANIFEST lives and the shard's file name; for `pipe:` commands, from the first
    `.../NAME.tar` path in the command (`pipe:cat /data/train-000001.tar`)."""
    if url.startswith("pipe:"):
        match = _SHARD_IN_URL.search(url[len("pipe:") :])
        if match is None:
            raise DataError(f"cannot find a '.../NAME.tar' path in the pipe: URL {url!r}")
        return match.group(1), match.group(2)
    directory, _, name = url.rpartition("/")
    return directory or ".", name


def _from_pattern(
    pattern: str, key: str, storage_options: dict[str, Any], missing_ok: bool
) -> tuple[_Split, dict]:
    """Shard URLs; their counts come from the MANIFEST in the directory of the first one."""
    urls = expand_urls(pattern, key)
    _check_local(urls, key, missing_ok)
    try:
        manifest = read_manifest(_dir_and_name(urls[0])[0], storage_options)
    except DataError as e:
        raise DataError(f"config key '{key}': {e}") from None
    declared = {s["name"]: int(s["samples"]) for info in manifest["splits"].values() for s in info["shards"]}
    names = [_dir_and_name(u)[1] for u in urls]
    unknown = [u for u, name in zip(urls, names, strict=True) if name not in declared]
    if unknown:
        raise DataError(
            f"config key '{key}': shard {unknown[0]} is not listed in the MANIFEST.json beside it; "
            "the data cursor needs each shard's sample count"
        )
    counts = [declared[name] for name in names]
    return _Split(urls, counts, sum(counts)), manifest


def _split(
    location: str, split: str, key: str, storage_options: dict[str, Any], missing_ok: bool
) -> tuple[_Split, dict]:
    if _is_directory(location):
        return _from_directory(location, split, key, storage_options)
    if not is_remote(location) and not any(c in location for c in "{}") and not Path(location).exists():
        raise DataError(
            f"config key '{key}': {location} does not exist. Prepare data with "
            f"`pipeline data prepare SOURCE --out DIR` and set {key}=DIR"
        )
    return _from_pattern(location, key, storage_options, missing_ok)


def resolve(
    train: str,
    val: str | None,
    storage_options: dict[str, Any] | None = None,
    missing_ok: bool = False,
    image_size: list[int] | tuple[int, int] | None = None,
) -> DataSpec:
    """Turn `data.train` / `data.val` (prepared dirs, local or s3://, or shard patterns) into shard
    lists with declared counts and shapes. Raises DataError naming the key."""
    options = storage_options or {}
    train_split, manifest = _split(train, "train", "data.train", options, missing_ok)
    if val is None:
        if not _is_directory(train):
            raise DataError("config key 'data.val' is required when data.train lists shard URLs")
        val_split, _ = _from_directory(train, "val", "data.train", options)
    else:
        val_split, _ = _split(val, "val", "data.val", options, missing_ok)
    _check_local(train_split.urls, "data.train", missing_ok)
    _check_local(val_split.urls, "data.val", missing_ok)
    kind = manifest.get("kind", "image")
    shape = manifest["sample_shape"]
    if image_size is not None and kind == "image":
        shape = [manifest.get("channels", shape[0] if shape else 3), *image_size]
    elif shape is None:
        raise DataError(
            "config key 'data.image_size': the images of data.train differ in size; set "
            "data.image_size=[H,W] to resize them when decoding"
        )
    return DataSpec(
        train_urls=train_split.urls,
        val_urls=val_split.urls,
        train_samples=train_split.samples,
        val_samples=val_split.samples,
        train_counts=train_split.counts,
        val_counts=val_split.counts,
        sample_shape=shape,
        num_classes=manifest["num_classes"],
        mean=manifest["normalize"]["mean"],
        std=manifest["normalize"]["std"],
        classes=manifest["classes"],
        kind=kind,
        image_size=list(image_size) if image_size is not None and kind == "image" else None,
    )
