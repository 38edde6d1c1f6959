"""Write WebDataset tar shards + MANIFEST.json, verify them, and resolve `data.train`/`data.val`.
The MANIFEST format and the checks on one read from anywhere are in data/manifest.py.

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
from pipeline.data.manifest import (  # re-exported: users of shards.X keep working
    FORMAT,
    FORMAT_INDEXED,
    HOW_TO_INDEX,
    HOW_TO_PREPARE,
    MANIFEST,
    DataError,
    _what,
    is_remote,
    read_manifest,
    shard_base,
    shard_url,
    shard_urls,
)
from pipeline.data.sources import Source
from pipeline.files import fsync_tree, sha256_file
from pipeline.vocab import Vocab, VocabError


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def sample_key(source_name: str, index: int) -> str:
    """A sample's key in its tar. Webdataset splits a member name at the first '.' of its file name
    (KEY.EXT), so a dot in the source's name (imagefolder:my.photos, npz:scans.v2.npz) would merge every
    sample of a shard into one: dots (and any '/') become '_'."""
    return f"{source_name.replace('.', '_').replace('/', '_')}-{index:06d}"


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
                key = sample_key(source.name, i)
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


_PREPARED_SHARD = re.compile(r"(train|val)-\d{6}\.tar")


def check_out(out: Path, overwrite: bool) -> None:
    """`--out` must be new or empty; `--overwrite` replaces only a dataset `prepare` wrote (its MANIFEST,
    its shards and nothing else), never a directory someone pointed it at by mistake (a home dir, an
    indexed dataset whose shards are the user's own)."""
    if out.is_symlink():  # replacing it would replace the link, not the dataset it points to
        raise ConfigError(f"--out {out} is a symlink; give the directory it points to ({out.resolve()})")
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; choose another --out")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not overwrite:
        raise ConfigError(f"--out {out} exists and is not empty; choose another dir or pass --overwrite")
    refuse = f"--overwrite refuses to replace {out}"
    try:
        manifest = read_manifest(out)
    except DataError as e:
        raise ConfigError(f"{refuse}: it is not a dataset `pipeline data prepare` wrote ({e})") from None
    if manifest["format"] != FORMAT:
        raise ConfigError(f"{refuse}: its {MANIFEST} indexes shards of yours (`pipeline data index`)")
    foreign = [name for name in entries if name != MANIFEST and not _PREPARED_SHARD.fullmatch(name)]
    if foreign:
        raise ConfigError(f"{refuse}: it holds files `prepare` did not write ({', '.join(foreign[:5])})")


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
    check_out(out, overwrite)
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
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished dataset `tmp` into place as `out` (check_out: new, empty, or a dataset
    `prepare` wrote, which is replaced)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old)  # onto the empty temp dir: a name nobody else uses
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _count_tar_samples(path: Path) -> int:
    keys = set()
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if member.isfile():
                keys.add(member.name.split("/")[-1].split(".", 1)[0])
    return len(keys)


def inspect_prepared(
    directory: Path,
    verify: bool = True,
    storage_options: dict[str, Any] | None = None,
    allow_pipe: bool = False,
) -> list[str]:
    """Check every shard against the MANIFEST (size, sha256, sample count). Returns the problems.
    Shards under a remote `root` (s3://, pipe:) are read whole when `verify`, else not checked; a
    `pipe:` root runs only with `allow_pipe` (see shard_urls)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    base = shard_base(manifest, str(directory))
    problems = []
    for split, info in manifest["splits"].items():
        # names leading outside the dataset (also through symlinks) are refused before any is read
        shard_urls(
            manifest, str(directory), info["shards"], allow_pipe=allow_pipe or not verify, key="inspect"
        )
        for shard in info["shards"]:
            if is_remote(base):
                if verify:
                    url = shard_url(manifest, str(directory), shard["name"])
                    problems += _verify_remote(url, shard, split, storage_options or {})
                continue
            path = Path(base.removeprefix("file://")) / shard["name"]
            if not path.is_file():
                problems.append(f"{split}: shard {path} is missing")
                continue
            size = path.stat().st_size
            if size != shard.get("bytes"):
                problems.append(f"{split}: shard {path} has {size} bytes, MANIFEST says {shard.get('bytes')}")
                continue
            if verify and sha256_file(path) != shard.get("sha256"):
                problems.append(f"{split}: shard {path} sha256 differs from the MANIFEST (corrupt?)")
                continue
            if verify:
                try:
                    n = _count_tar_samples(path) if manifest["format"] == FORMAT else _count_stream(str(path))
                except (tarfile.TarError, DataError) as e:
                    problems.append(f"{split}: shard {path} is not a readable tar: {e}")
                    continue
                if n != shard["samples"]:
                    problems.append(
                        f"{split}: shard {path} holds {n} samples, MANIFEST says {shard['samples']}"
                    )
    return problems


def _count_stream(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Samples as training reads them (webdataset's grouping), for indexed shards."""
    from pipeline.data import index  # imports torch and webdataset: only when verifying

    return index.scan_shard(url, storage_options or {}).samples


def _verify_remote(url: str, shard: dict[str, Any], split: str, storage_options: dict[str, Any]) -> list[str]:
    from pipeline.data import index

    try:
        info = index.scan_shard(url, storage_options)
    except DataError as e:
        return [f"{split}: {e}"]
    if (info.bytes, info.sha256) != (shard["bytes"], shard["sha256"]):
        return [f"{split}: shard {url}: {info.bytes} bytes or sha256 differ from the MANIFEST (changed?)"]
    if info.samples != shard["samples"]:
        return [f"{split}: shard {url} holds {info.samples} samples, MANIFEST says {shard['samples']}"]
    return []


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
    # What the MANIFEST detected (`pipeline data index`); data.fields overrides it; {}: detect per sample.
    fields: dict[str, str | None] = field(default_factory=dict)
    label_type: str | None = "int"  # "int" | "name" (class names, looked up in `classes`) | None: no labels
    decode: str | None = None  # the decode function the MANIFEST was indexed with (never imported from it)
    indexed: bool = False  # `pipeline data index` (users' shards) rather than `pipeline data prepare`
    # an environment task's action space (envs.spaces); kind is then "environment" and sample_shape
    # the observation shape
    action_space: dict[str, Any] | None = None
    # token data (`pipeline data prepare text:`): kind "tokens", "char" | "byte" (vocab.py); classes
    # are then the symbols, num_classes the vocabulary size, sample_shape [seq_len + 1]
    vocab: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        return cls(**d)


def _has_braces(text: str) -> bool:
    return "{" in text or "}" in text


def split_parts(pattern: str, key: str, missing_ok: bool = False) -> list[str]:
    """The parts of a `::` list (`a.tar::dir/b-{0..3}.tar`), each local part without braces checked
    to exist first, so a missing one is named as such (not as a brace or MANIFEST problem)."""
    parts = [part.strip() for part in pattern.split("::")]
    if any(not part for part in parts):
        raise DataError(f"{_what(key)}: '{pattern}' has an empty part between '::'")
    if len(parts) > 1:
        for number, part in enumerate(parts, 1):
            if is_remote(part) or _has_braces(part) or Path(part.removeprefix("file://")).is_file():
                continue
            message = f"{_what(key)}: part {number} of {len(parts)} ({part}) does not exist"
            if Path(part.removeprefix("file://")).is_dir():
                message = f"{_what(key)}: part {number} ({part}) is a directory, not a shard file"
            if not missing_ok or Path(part.removeprefix("file://")).is_dir():
                raise DataError(message)
    return parts


def expand_urls(pattern: str, key: str, missing_ok: bool = False) -> list[str]:
    """Brace-expand a shard pattern (`dir/train-{000000..000011}.tar`; `::` joins several)."""
    import braceexpand  # a webdataset dependency

    urls = []
    for part in split_parts(pattern, key, missing_ok):
        try:
            urls += list(braceexpand.braceexpand(part))
        except Exception as e:  # braceexpand raises its own UnbalancedBracesError (a ValueError)
            raise DataError(f"{_what(key)}: cannot expand '{part}': {e}") from None
    if not urls:
        raise DataError(f"{_what(key)}: '{pattern}' names no shards")
    return urls


def _check_local(urls: list[str], key: str, missing_ok: bool) -> None:
    missing = [u for u in urls if not is_remote(u) and not Path(u.removeprefix("file://")).is_file()]
    if not missing:
        return
    message = f"config key '{key}': {len(missing)} of {len(urls)} shard(s) not found, first: {missing[0]}"
    if not missing_ok:
        raise DataError(
            f"{message}. Point the key at a directory with a {MANIFEST} ({HOW_TO_INDEX}, or "
            f"{HOW_TO_PREPARE}), or set data.on_error=skip to train without them"
        )
    print(f"warning: {message}; data.on_error=skip: their samples will be skipped and counted")


def _check_sizes(split: _Split, key: str, missing_ok: bool) -> None:
    """A 0-byte or short local shard (a copy cut short, a full disk) found before anything starts: one
    stat per shard against the size its MANIFEST recorded (the sha256 is `pipeline data inspect`'s)."""
    wrong = []
    for url, declared in zip(split.urls, split.sizes, strict=True):
        path = Path(url.removeprefix("file://"))
        if is_remote(url) or not path.is_file():  # missing ones are _check_local's
            continue
        size = path.stat().st_size
        if size == 0 or (declared is not None and size != declared):
            wrong.append(f"{url} has {size} bytes, its {MANIFEST} says {declared}")
    if not wrong:
        return
    message = f"config key '{key}': {len(wrong)} of {len(split.urls)} shard(s) are damaged, first: {wrong[0]}"
    if not missing_ok:
        raise DataError(
            f"{message}. Copy them again (or re-run `pipeline data prepare`/`pipeline data index`), or set "
            "data.on_error=skip to train on what is readable"
        )
    print(f"warning: {message}; data.on_error=skip: their unreadable samples will be skipped and counted")


def _is_directory(location: str) -> bool:
    if is_remote(location):
        return not any(c in location for c in "{}") and not location.endswith((".tar", ".tgz", ".tar.gz"))
    return Path(location.removeprefix("file://")).is_dir()


@dataclass
class _Split:
    urls: list[str]
    counts: list[int]
    samples: int
    sizes: list[int | None]  # declared bytes per shard (MANIFEST), None where not recorded


def _from_directory(
    location: str, split: str, key: str, storage_options: dict[str, Any], allow_pipe: bool = False
) -> tuple[_Split, dict]:
    manifest = read_manifest(location, storage_options)
    if split not in manifest["splits"]:
        hint = ""
        if split == "val":
            hint = (
                "; set data.val to val shards (or their dir), or index a val split with "
                "`pipeline data index SHARDS --out DIR --val VAL_SHARDS` (or --val-fraction F)"
            )
        raise DataError(f"config key '{key}': {location}/{MANIFEST} has no '{split}' split{hint}")
    shard_list = manifest["splits"][split]["shards"]
    urls = shard_urls(manifest, location, shard_list, allow_pipe=allow_pipe, key=key)
    counts = [int(s["samples"]) for s in shard_list]
    return _Split(urls, counts, sum(counts), [s.get("bytes") for s in shard_list]), manifest


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
    """Shard URLs; their counts come from the MANIFEST in each one's directory (the first one's
    MANIFEST gives shapes and classes)."""
    urls = expand_urls(pattern, key, missing_ok)
    _check_local(urls, key, missing_ok)
    manifests: dict[str, dict] = {}
    declared: dict[str, dict[str, dict]] = {}  # directory -> shard name -> its MANIFEST entry
    counts, sizes = [], []
    for url in urls:
        directory, name = _dir_and_name(url)
        if directory not in manifests:
            try:
                manifests[directory] = manifest = read_manifest(directory, storage_options)
            except DataError as e:
                raise DataError(f"config key '{key}': {e}") from None
            # a MANIFEST with a `root` describes shards elsewhere, not the ones beside it
            declared[directory] = {
                s["name"]: s
                for info in manifest["splits"].values()
                for s in info["shards"]
                if "root" not in manifest
            }
        if name not in declared[directory]:
            raise DataError(
                f"config key '{key}': shard {url} is not listed in the {MANIFEST} beside it; the data "
                f"cursor needs each shard's sample count: {HOW_TO_INDEX} and set {key}=DIR"
            )
        counts.append(int(declared[directory][name]["samples"]))
        sizes.append(declared[directory][name].get("bytes"))
    return _Split(urls, counts, sum(counts), sizes), manifests[_dir_and_name(urls[0])[0]]


def _split(
    location: str, split: str, key: str, storage_options: dict[str, Any], missing_ok: bool, allow_pipe: bool
) -> tuple[_Split, dict]:
    if "::" not in location and _is_directory(location):
        return _from_directory(location, split, key, storage_options, allow_pipe)
    if (
        "::" not in location
        and not is_remote(location)
        and not _has_braces(location)
        and not Path(location.removeprefix("file://")).exists()
    ):
        raise DataError(
            f"config key '{key}': {location} does not exist. Prepare data with "
            f"`pipeline data prepare SOURCE --out DIR` (or {HOW_TO_INDEX}) and set {key}=DIR"
        )
    return _from_pattern(location, key, storage_options, missing_ok)


def resolve(
    train: str,
    val: str | None,
    storage_options: dict[str, Any] | None = None,
    missing_ok: bool = False,
    image_size: list[int] | tuple[int, int] | None = None,
    allow_manifest_pipe: bool = False,
) -> DataSpec:
    """Turn `data.train` / `data.val` (prepared dirs, local or s3://, or shard patterns) into shard
    lists with declared counts and shapes. Raises DataError naming the key. `allow_manifest_pipe`:
    run the `pipe:` command a MANIFEST's root names (data.allow_manifest_pipe)."""
    options = storage_options or {}
    pipe = allow_manifest_pipe
    train_split, manifest = _split(train, "train", "data.train", options, missing_ok, pipe)
    if val is None:
        if not _is_directory(train):
            raise DataError("config key 'data.val' is required when data.train lists shard URLs")
        val_split, _ = _from_directory(train, "val", "data.train", options, pipe)
    else:
        val_split, _ = _split(val, "val", "data.val", options, missing_ok, pipe)
    if not train_split.urls:  # the loader would wait for a first sample forever, before any collective
        raise DataError(f"config key 'data.train': {train} declares no train samples; {HOW_TO_PREPARE}")
    for split, key in ((train_split, "data.train"), (val_split, "data.val")):
        _check_local(split.urls, key, missing_ok)
        _check_sizes(split, key, missing_ok)
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
        fields=dict(manifest.get("fields") or {}),
        label_type=manifest.get("label_type", "int"),
        decode=manifest.get("decode"),
        indexed=manifest["format"] == FORMAT_INDEXED,
        vocab=_token_vocab(manifest, train) if kind == "tokens" else None,
    )


def _token_vocab(manifest: dict[str, Any], location: str) -> str:
    """The vocabulary of token shards, checked: a MANIFEST may come from anyone."""
    try:
        Vocab.from_manifest(manifest.get("vocab"), manifest["classes"])
    except VocabError as e:
        raise DataError(f"config key 'data.train': the {MANIFEST} of {location}: {e}") from None
    shape = manifest["sample_shape"]
    if shape is None or len(shape) != 1 or shape[0] < 2:
        raise DataError(
            f"config key 'data.train': the {MANIFEST} of {location} declares token windows of shape "
            f"{shape}, expected [seq_len + 1]; prepare the text again with `pipeline data prepare text:PATH`"
        )
    return manifest["vocab"]
