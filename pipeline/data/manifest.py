"""Data MANIFESTs: their formats, reading one from a directory or URL, and what is checked before any
of it is used. A MANIFEST may come from anyone (a colleague, a bucket, a download): every shard name is
a plain relative path confined to its directory (files.plain/confined: no '..', not absolute, no symlink
out), its sections and counts are what training needs, and a `pipe:` root (a shell command) runs only
when the user allows it (data.allow_manifest_pipe).

A prepared directory (`pipeline data prepare`, format pipeline-shards/1):
    MANIFEST.json          format, source, classes, sample shape, normalisation, splits with
                           per-shard {name, samples, bytes, sha256}
    train-000000.tar ...   WebDataset shards: <key>.png (encoded image) + <key>.cls (label, ascii)
    val-000000.tar ...

An indexed directory (`pipeline data index`, pipeline/data/index.py, format pipeline-shards/2): the
same MANIFEST over a user's existing shards, plus the detected `fields` (input and target keys),
`keys`, `label_type` and, when the MANIFEST is not in the shards' own directory, a top-level `root`
(directory or URL prefix) that the shard names are relative to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.files import confined, plain

MANIFEST = "MANIFEST.json"
FORMAT = "pipeline-shards/1"  # `pipeline data prepare`
FORMAT_INDEXED = "pipeline-shards/2"  # `pipeline data index`: adds root, fields, keys, label_type
FORMATS = (FORMAT, FORMAT_INDEXED)
HOW_TO_INDEX = "index existing shards with `pipeline data index SHARDS --out DIR`"
HOW_TO_PREPARE = "write new ones with `pipeline data prepare SOURCE --out DIR`"


class DataError(ConfigError):
    """Bad input data found before training starts (exit 2)."""


def _what(key: str) -> str:
    """How errors name where a pattern came from: a config key, or a CLI argument (SHARDS, --val)."""
    return f"config key '{key}'" if key.startswith("data.") else key


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
        raise DataError(
            f"{directory} has no {MANIFEST} (the per-shard sample counts the data cursor needs): "
            f"{HOW_TO_INDEX}, or {HOW_TO_PREPARE}"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 JSON ({e}); re-run `pipeline data index` (or `prepare`)"
        ) from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path} is not valid JSON ({e}); re-run `pipeline data index` (or `pipeline data prepare`)"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path}: unknown format {found!r}, expected one of {', '.join(FORMATS)}")
    check_manifest(manifest, path)
    return manifest


def _sections_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with the top-level sections training reads (None: nothing)."""
    for key, kind in (("splits", dict), ("classes", list), ("num_classes", int), ("normalize", dict)):
        if key not in manifest:
            return f"lacks the '{key}' section"
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            return f"'{key}' must be a {kind.__name__}, not {type(manifest[key]).__name__}"
    if len(manifest["classes"]) != manifest["num_classes"]:
        return f"'num_classes' is {manifest['num_classes']} but 'classes' names {len(manifest['classes'])}"
    if "sample_shape" not in manifest:
        return "lacks the 'sample_shape' section"
    shape = manifest["sample_shape"]
    if shape is not None and (
        not isinstance(shape, list) or not shape or not all(_is_count(d) and d > 0 for d in shape)
    ):  # None: the images differ in size (data.image_size resizes them)
        return f"'sample_shape' must be a list of sizes > 0 (or null), not {shape!r}"
    mean, std = manifest["normalize"].get("mean"), manifest["normalize"].get("std")
    if not (isinstance(mean, list) and isinstance(std, list) and mean and len(mean) == len(std)):
        return "'normalize' needs 'mean' and 'std' lists of the same length"
    if not all(isinstance(v, int | float) for v in mean) or not all(
        isinstance(v, int | float) and v > 0 for v in std
    ):
        return "'normalize' mean must be numbers and std numbers > 0"
    root = manifest.get("root")
    if root is not None and (not isinstance(root, str) or not root):
        return f"'root' must be a directory or URL prefix, not {root!r}"
    if manifest.get("root_suffix") and not str(root).startswith("pipe:"):
        return "'root_suffix' belongs to a `pipe:` root only"
    return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_manifest(manifest: dict[str, Any], path: str) -> None:
    """A data MANIFEST from anywhere (ours, a colleague's, a bucket's), before any of it is used: the
    sections training reads, and every shard entry a plain relative name (files.plain) declaring a
    sample count > 0 (a reader given only shards without samples would spin forever) and its size."""
    problem = _sections_problem(manifest)
    if problem is None:
        problem = next(
            filter(None, (_split_problem(s, i, path) for s, i in manifest["splits"].items())), None
        )
    if problem is not None:
        raise DataError(
            f"{path}: {problem}; write it again with `pipeline data prepare` or `pipeline data index`"
        )


def _split_problem(split: str, info: Any, path: str) -> str | None:
    if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
        return f"split '{split}' must be an object with a 'shards' list"
    for shard in info["shards"]:
        if not isinstance(shard, dict):
            return f"split '{split}': each shard must be an object {{name, samples, bytes, sha256}}"
        check_name(shard.get("name"), path)
        if not _is_count(shard.get("samples")) or shard["samples"] < 1:
            return f"shard {shard['name']!r} declares {shard.get('samples')!r} samples (must be >= 1)"
        if "bytes" in shard and (not _is_count(shard["bytes"]) or shard["bytes"] < 0):
            return f"shard {shard['name']!r} declares {shard['bytes']!r} bytes"
    return None


def check_name(name: Any, where: str) -> None:
    """Shard names in a MANIFEST are plain relative paths under its directory (or its `root`): the one
    rule of files.plain, also for names `pipeline data index` writes."""
    plain(name, where=where, error=DataError)


def shard_base(manifest: dict[str, Any], directory: str) -> str:
    """Where a MANIFEST's shard names are relative to: its `root`, else its own directory."""
    return str(manifest.get("root") or directory).rstrip("/")


def shard_url(manifest: dict[str, Any], directory: str, name: str) -> str:
    """A shard's URL: base/name (+ the `root_suffix` of a `pipe:` command, e.g. ' -')."""
    return f"{shard_base(manifest, directory)}/{name}{manifest.get('root_suffix', '')}"


ALLOW_PIPE_KEY = "data.allow_manifest_pipe"


def shard_urls(
    manifest: dict[str, Any], directory: str, entries: list[dict], *, allow_pipe: bool, key: str
) -> list[str]:
    """The URLs of a MANIFEST's shard `entries`, each name confined to its base: a local base through
    symlinks too (files.confined), a URL base by name (read_manifest checked them). A `pipe:` root is
    a shell command whoever wrote the MANIFEST chose: it runs only with `allow_pipe` (the user's
    data.allow_manifest_pipe); `pipe:` URLs users write in data.train/data.val are theirs and run."""
    where = f"{str(directory).rstrip('/')}/{MANIFEST}"
    base = shard_base(manifest, str(directory))
    if base.startswith("pipe:") and not allow_pipe:
        raise DataError(
            f"{_what(key)}: {where} names the shell command {base!r} as its root (`pipe:`); a MANIFEST "
            f"can come from anyone, so its commands never run unless you say so: set {ALLOW_PIPE_KEY}=true "
            "(`pipeline data inspect --allow-manifest-pipe`) if you wrote or checked this MANIFEST, or give "
            "the pipe: URLs in data.train/data.val yourself"
        )
    if not is_remote(base):
        for entry in entries:
            confined(Path(base.removeprefix("file://")), entry["name"], where=where, error=DataError)
    return [shard_url(manifest, str(directory), entry["name"]) for entry in entries]
