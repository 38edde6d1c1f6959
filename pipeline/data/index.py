"""`pipeline data index`: a MANIFEST for users' existing WebDataset shards, read once, never rewritten.

Training needs what `pipeline data prepare` records for its own shards: each shard's sample count
(the data cursor plans with them), classes, the input shape (models adapt to it) and normalisation
statistics. `index_shards` reads shards written by anything (webdataset's ShardWriter, tarp, a script)
once each, hashing them as it goes, and writes only DIR/MANIFEST.json (format pipeline-shards/2):

    format, source "index", shards (as given), seed, val_fraction
    root (+ root_suffix)   where the shard names are relative to, when DIR is not the shards' own dir
    fields                 {input, target}: the sample keys decoded as input and target (or null)
    decode                 the data.decode function the statistics came from (never imported from here)
    keys                   the member keys (extensions) of all samples
    classes, num_classes, class_map, label_type ("int": max label + 1 classes; "name": sorted names)
    kind, channels, sample_shape, normalize {mean, std}, stats_samples
    splits                 {train, val}: {samples, shards: [{name, samples, bytes, sha256, keys}]}

Samples are counted exactly as training reads them (the same webdataset grouping, `stream.iter_samples`).
Inputs are decoded by the same `decode.Decoder` the run uses, for a seeded reservoir of at most
STATS_SAMPLES samples over all indexed shards (train and val, as `prepare` does over its source);
targets are read for every sample (with data.decode, every sample is decoded).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import shards
from pipeline.data.manifest import ALLOW_PIPE_KEY, check_name
from pipeline.data.shards import MANIFEST, DataError, DataSpec, is_remote
from pipeline.data.transforms import conform, find_input_key, find_target_key, is_image_array, members

STATS_SAMPLES = 2000  # inputs decoded for shape and normalisation statistics (as `prepare`)
SHARD_SUFFIXES = (".tar", ".tgz", ".tar.gz")
MAX_BAD_SHOWN = 5


@dataclass
class ShardInfo:
    samples: int
    bytes: int
    sha256: str
    keys: list[str]


class _Hashing:
    """A read-only stream that hashes and counts what passes through (the shard is read once)."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.sha256, self.bytes = raw, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        """Read what the tar reader left (the end-of-archive padding): the hash covers the whole file."""
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self.raw.close()

    def __repr__(self) -> str:
        return "<shard stream>"


def _reason(e: BaseException) -> str:
    # webdataset appends the stream and URL to an exception's args: keep the message
    return str(e.args[0]) if e.args else type(e).__name__


def scan_shard(
    url: str, storage_options: dict[str, Any], visit: Callable[[dict], None] | None = None
) -> ShardInfo:
    """Read one shard once: its samples (grouped as training groups them; each passed to `visit`),
    bytes, sha256 and member keys. A shard that cannot be opened or read is a DataError naming it."""
    from pipeline.data import stream  # webdataset lives there

    try:
        raw = stream.open_shard(url, storage_options)
    except (OSError, ValueError) as e:
        raise DataError(f"shard {url} cannot be opened: {e}") from None
    hashing = _Hashing(raw)
    count, keys = 0, set()
    try:
        for sample in stream.iter_samples(hashing, url):
            count += 1
            keys.update(members(sample))
            if visit is not None:
                visit(sample)
        hashing.drain()
    except DataError:
        raise
    except Exception as e:  # tarfile.ReadError, webdataset's ValueErrors (duplicate names) ...
        raise DataError(f"shard {url} is not a readable WebDataset tar: {_reason(e)}") from None
    finally:
        with contextlib.suppress(Exception):  # a `pipe:` command's exit status: the data was read
            hashing.close()
    return ShardInfo(count, hashing.bytes, hashing.sha256.hexdigest(), sorted(keys))


# --- which shards --------------------------------------------------------------------------------------


def list_shards(text: str, what: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Shard URLs from SHARDS: a directory (its *.tar files, sorted), a brace pattern, a file, an
    `s3://` prefix or pattern (fsspec), `pipe:` commands; `::` joins several. Local ones must exist."""
    import braceexpand  # a webdataset dependency

    urls: list[str] = []
    for part in shards.split_parts(text, what):
        if part.startswith("pipe:") or (is_remote(part) and "{" in part):
            try:
                urls += list(braceexpand.braceexpand(part))
            except Exception as e:
                raise DataError(f"{what}: cannot expand '{part}': {e}") from None
        elif is_remote(part):
            urls += (
                [part] if part.endswith(SHARD_SUFFIXES) else _remote_dir(part, what, storage_options or {})
            )
        elif "{" in part or "}" in part:
            expanded = shards.expand_urls(part, what)
            missing = [u for u in expanded if not Path(u.removeprefix("file://")).is_file()]
            if missing:
                raise DataError(
                    f"{what}: {len(missing)} of {len(expanded)} shard(s) of '{part}' do not exist, first: "
                    f"{missing[0]}"
                )
            urls += expanded
        else:
            path = Path(part.removeprefix("file://"))
            if path.is_dir():
                found = sorted(
                    str(p) for p in path.iterdir() if p.is_file() and p.name.endswith(SHARD_SUFFIXES)
                )
                if not found:
                    raise DataError(f"{what}: directory {part} holds no .tar shards")
                urls += found
            elif path.is_file():
                urls.append(str(path))
            else:
                raise DataError(f"{what}: {part} does not exist")
    duplicates = [u for u, n in Counter(urls).items() if n > 1]
    if duplicates:
        raise DataError(f"{what}: shard {duplicates[0]} is named twice")
    return urls


def _remote_dir(prefix: str, what: str, storage_options: dict[str, Any]) -> list[str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(prefix, **storage_options)
    try:
        names = sorted(p for p in fs.ls(path.rstrip("/"), detail=False) if p.endswith(SHARD_SUFFIXES))
    except FileNotFoundError:
        raise DataError(f"{what}: {prefix} does not exist") from None
    if not names:
        raise DataError(f"{what}: {prefix} holds no .tar shards")
    scheme = prefix.split("://", 1)[0]
    return [f"{scheme}://{name}" for name in names]


def _common_dir(dirs: list[str]) -> str:
    """The longest common '/'-separated prefix of directories (URLs or paths)."""
    split = [d.rstrip("/").split("/") for d in dirs]
    common: list[str] = []
    for parts in zip(*split, strict=False):
        if any(p != parts[0] for p in parts):
            break
        common.append(parts[0])
    return "/".join(common)


def root_and_names(urls: list[str], out: str) -> tuple[str | None, list[str], str]:
    """(root, shard names relative to it, root_suffix). The root is None when it is `out` itself
    (the MANIFEST sits beside the shards); names are plain relative paths (manifest.check_name, the
    rule every MANIFEST's names follow)."""
    if any(u.startswith("pipe:") for u in urls):
        if not all(u.startswith("pipe:") for u in urls):
            raise DataError("`pipe:` shards and other shards cannot be indexed together")
        heads, dirs, names, tails = set(), [], [], set()
        for url in urls:
            command = url[len("pipe:") :]
            match = shards._SHARD_IN_URL.search(command)
            if match is None:
                raise DataError(f"cannot find a '.../NAME.tar' path in the pipe: URL {url!r}")
            heads.add(command[: match.start(1)])
            dirs.append(match.group(1))
            names.append(match.group(2))
            tails.add(command[match.end(2) :])
        if len(heads) > 1 or len(tails) > 1:
            raise DataError("`pipe:` shards must all be the same command around their path to be indexed")
        common = _common_dir(dirs)
        rel = [f"{d[len(common) :].strip('/')}/{n}".lstrip("/") for d, n in zip(dirs, names, strict=True)]
        return f"pipe:{heads.pop()}{common}", rel, tails.pop()
    remote = {is_remote(u) for u in urls}
    if len(remote) > 1:
        raise DataError("local and remote (s3://...) shards cannot be indexed together")
    if remote.pop():
        common = _common_dir([u.rpartition("/")[0] for u in urls])
        if common.count("/") < 2 or common.endswith(":/"):
            raise DataError("remote shards to index together must share a bucket (a common URL prefix)")
        names = [u[len(common) + 1 :] for u in urls]
        root = None if out.rstrip("/") == common else common
    else:
        # real paths: a shard that is a symlink is recorded where it lives, since training refuses a
        # name that leads out of its MANIFEST's directory through a symlink (files.confined)
        paths = [os.path.realpath(u.removeprefix("file://")) for u in urls]
        common = os.path.commonpath([os.path.dirname(p) for p in paths])
        names = [Path(p).relative_to(common).as_posix() for p in paths]
        root = None if not is_remote(out) and os.path.realpath(out) == common else common
    for name in names:
        check_name(name, "index")
    return root, names, ""


def hold_out(urls: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val): round(fraction x shards) whole shards, seeded, held out as val (order kept)."""
    if not 0.0 < fraction < 1.0:
        raise DataError("--val-fraction must be in (0, 1)")
    count = max(1, round(len(urls) * fraction))
    if count >= len(urls):
        raise DataError(
            f"--val-fraction {fraction}: {len(urls)} shard(s) cannot give {count} whole val shard(s) and "
            "keep one for training; write more shards, or pass --val"
        )
    chosen = set(np.random.default_rng(seed).choice(len(urls), count, replace=False).tolist())
    return [u for i, u in enumerate(urls) if i not in chosen], [u for i, u in enumerate(urls) if i in chosen]


# --- reading the samples ----------------------------------------------------------------------------


@dataclass
class _Stats:
    """Per-channel running mean and sum of squared deviations (Chan et al.'s parallel merge)."""

    count: float = 0.0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    @staticmethod
    def of(values: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """(count, mean, m2) per channel of values (N, C) float64: one sample's summary."""
        mean = values.mean(0)
        return float(len(values)), mean, ((values - mean) ** 2).sum(0)

    def add(self, n: float, mean: np.ndarray, m2: np.ndarray) -> None:
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def result(self) -> tuple[list[float], list[float]]:
        std = np.sqrt(self.m2 / self.count)
        return [float(m) for m in self.mean], [float(s) or 1.0 for s in std]


@dataclass
class _Reader:
    """What one pass over the samples collects: targets of all, inputs of a seeded reservoir."""

    decoder: Any  # decode.Decoder
    kind: str
    channels: int
    rng: np.random.Generator
    seen: int = 0
    targets: Counter = field(default_factory=Counter)
    # reservoir slot -> (sample number, shape, (count, mean, m2)): summaries, not pixels (memory)
    reservoir: dict[int, tuple[int, tuple[int, ...], tuple]] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)

    def visit(self, sample: dict) -> None:
        index, self.seen = self.seen, self.seen + 1
        slot = index if index < STATS_SAMPLES else int(self.rng.integers(0, index + 1))
        selected = slot < STATS_SAMPLES  # Algorithm R: decided before decoding, so at most ~K ln(N/K) decodes
        try:
            value, target = self.decoder.raw(sample, need_input=selected)
            if selected:
                self.reservoir[slot] = (index, *self._summary(value))
        except ValueError as e:
            self.bad.append(f"sample '{sample.get('__key__')}' in shard {sample.get('__url__')}: {e}")
            return
        if target is not None:
            self.targets[target] += 1

    def _summary(self, value: Any) -> tuple[tuple[int, ...], tuple]:
        """(shape the model sees, (count, mean, m2) per channel) of one input."""
        from pipeline.data.decode import decoded_shape

        if self.kind == "image":
            if not isinstance(value, np.ndarray) or not is_image_array(value):
                raise ValueError(
                    f"input is {getattr(value, 'dtype', type(value))}, not uint8 pixels like the first"
                )
            if value.ndim == 3 and value.shape[2] == 1:
                value = value[:, :, 0]
            pixels = conform(value, self.channels, None)
            values = pixels.reshape(-1, self.channels).astype(np.float64) / 255.0
            return tuple(decoded_shape(pixels, "image")), _Stats.of(values)
        array = np.asarray(value.numpy() if hasattr(value, "numpy") else value, dtype=np.float64)
        return tuple(array.shape), _Stats.of(array.reshape(-1, 1))


def _first_sample(urls: list[str], storage_options: dict[str, Any]) -> dict:
    from pipeline.data import stream

    try:
        samples = stream.first_samples(urls[0], storage_options, 1)
    except Exception as e:
        raise DataError(f"shard {urls[0]} cannot be read: {_reason(e)}") from None
    if not samples:
        raise DataError(f"shard {urls[0]} holds no samples")
    return samples[0]


def detect(
    sample: dict, input_key: str | None, target_key: str | None, decode: str | None
) -> tuple[Any, str, int]:
    """(Decoder for the index pass, kind, channels) from the first sample: which keys are input and
    target (given, else by convention) and whether the input is pixels (image) or an array."""
    from pipeline.data.decode import Decoder

    url, key = sample.get("__url__"), sample.get("__key__")
    has = ", ".join(members(sample))
    if decode is None:
        input_key = input_key or find_input_key(sample)
        if input_key is None:
            raise DataError(
                f"shard {url}: cannot tell which key of sample '{key}' is the input (it has: {has}); pass "
                "--input KEY (data.fields.input), or --decode for another format"
            )
        if input_key not in sample:
            raise DataError(f"shard {url}: sample '{key}' has no input '{input_key}' (it has: {has})")
        target_key = target_key or find_target_key(sample)
    fields = {"input": input_key, "target": target_key}
    probe = DataSpec([], [], 0, 0, [], [], [], 0, [0.0], [1.0], fields=fields, decode=decode)
    probe.label_type = None if target_key is None and decode is None else "int"
    decoder = Decoder(probe, None, 0, None, decode)
    try:
        value, _ = decoder.raw(sample)
    except ValueError as e:
        raise DataError(f"shard {url}: sample '{key}': {e}") from None
    array = value.numpy() if hasattr(value, "numpy") and not isinstance(value, np.ndarray) else value
    if isinstance(array, np.ndarray) and is_image_array(array):
        channels = 1 if array.ndim == 2 or array.shape[2] == 1 else int(array.shape[2])
        return decoder, "image", channels
    return decoder, "sequence", 1


def _labels(targets: Counter) -> tuple[list[str], str | None]:
    """(class names, label type) from every target seen: ints 0..max, or sorted class names."""
    if not targets:
        return [], None
    kinds = {type(t) for t in targets}
    if kinds == {int}:
        negative = [t for t in targets if t < 0]
        if negative:
            raise DataError(f"labels must be >= 0; found {negative[0]}")
        return [str(i) for i in range(max(targets) + 1)], "int"
    if kinds == {str}:
        return sorted(targets), "name"
    raise DataError("the labels mix integers and class names; write one kind (or map them in --decode)")


def index_shards(
    train: str,
    out: str | Path,
    *,
    val: str | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    input_key: str | None = None,
    target_key: str | None = None,
    decode: str | None = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Index existing shards into OUT/MANIFEST.json (written atomically; the shards are only read)."""
    options = storage_options or {}
    out = str(out).rstrip("/") or "/"
    if val is not None and val_fraction:
        raise DataError("pass either --val or --val-fraction, not both")
    if decode is not None and (input_key or target_key):
        raise DataError("--decode replaces --input/--target (the function picks its own keys)")
    if _manifest_exists(out, options) and not overwrite:
        raise DataError(f"{out}/{MANIFEST} exists; pass --overwrite to replace it")
    if decode is not None:
        from pipeline import imports

        imports.load_object(decode, key="data.decode")  # a wrong path fails before any shard is read

    train_urls = list_shards(train, "SHARDS", options)
    val_urls = list_shards(val, "--val", options) if val is not None else []
    if val_fraction:
        train_urls, val_urls = hold_out(train_urls, val_fraction, seed)
    overlap = set(train_urls) & set(val_urls)
    if overlap:
        raise DataError(f"shard {sorted(overlap)[0]} is both in SHARDS and in --val")
    root, names, root_suffix = root_and_names(train_urls + val_urls, out)

    decoder, kind, channels = detect(_first_sample(train_urls, options), input_key, target_key, decode)
    reader = _Reader(decoder, kind, channels, np.random.default_rng(seed))
    splits: dict[str, Any] = {}
    position = 0
    for split, urls in (("train", train_urls), ("val", val_urls)):
        if not urls:
            continue
        entries = []
        for url in urls:
            info = scan_shard(url, options, reader.visit)
            if info.samples == 0:
                raise DataError(f"shard {url} holds no samples (no member named KEY.EXT); remove it")
            entries.append(
                {
                    "name": names[position],
                    "samples": info.samples,
                    "bytes": info.bytes,
                    "sha256": info.sha256,
                    "keys": info.keys,
                }
            )
            position += 1
            echo(f"{split}: {url}: {info.samples} samples, {info.bytes / 1e6:.2f} MB")
        splits[split] = {"samples": sum(e["samples"] for e in entries), "shards": entries}

    if not reader.reservoir:
        raise DataError(f"no input of the {reader.seen} samples could be decoded; first: {reader.bad[0]}")
    chosen = [
        reader.reservoir[slot] for slot in sorted(reader.reservoir, key=lambda s: reader.reservoir[s][0])
    ]
    shapes = {shape for _, shape, _ in chosen}
    stats = _Stats()
    for _, _, summary in chosen:
        stats.add(*summary)
    mean, std = stats.result()
    classes, label_type = _labels(reader.targets)
    fields = decoder.spec.fields if decode is None else {"input": None, "target": None}
    manifest: dict[str, Any] = {
        "format": shards.FORMAT_INDEXED,
        "source": "index",
        "shards": train,
        "val_shards": val,
        "seed": seed,
        "val_fraction": val_fraction,
    }
    if root is not None:
        manifest["root"] = root
    if root_suffix:
        manifest["root_suffix"] = root_suffix
    manifest |= {
        "fields": fields,
        "decode": decode,
        "keys": sorted({k for info in splits.values() for s in info["shards"] for k in s["keys"]}),
        "classes": classes,
        "num_classes": len(classes),
        "class_map": {name: i for i, name in enumerate(classes)},
        "label_type": label_type,
        "kind": kind,
        "channels": channels,
        "sample_shape": list(shapes.pop()) if len(shapes) == 1 else None,  # None: set data.image_size
        "normalize": {"mean": mean, "std": std},
        "stats_samples": len(chosen),
        "bad_samples": len(reader.bad),
        "splits": splits,
    }
    for problem in reader.bad[:MAX_BAD_SHOWN]:
        echo(f"warning: {problem}")
    if reader.bad:
        echo(
            f"warning: {len(reader.bad)} sample(s) could not be read (data.on_error=skip skips them, "
            "strict stops at the first)"
        )
    if label_type is None:
        echo("warning: no label key found (cls, label, target, json.label): indexed without labels")
    if root is not None and root.startswith("pipe:"):  # manifest.shard_urls: never run unless allowed
        echo(f"note: the root is a shell command; train with {ALLOW_PIPE_KEY}=true to run it")
    _write_manifest(out, manifest, options)
    return manifest


def _manifest_exists(out: str, storage_options: dict[str, Any]) -> bool:
    if is_remote(out):
        import fsspec

        fs, path = fsspec.core.url_to_fs(out, **storage_options)
        return fs.exists(f"{path}/{MANIFEST}")
    return (Path(out) / MANIFEST).exists()


def _write_manifest(out: str, manifest: dict[str, Any], storage_options: dict[str, Any]) -> None:
    """Atomically: a temp file renamed over MANIFEST.json (an object store PUT is atomic itself)."""
    text = json.dumps(manifest, indent=2) + "\n"
    if is_remote(out):
        import fsspec

        with fsspec.open(f"{out}/{MANIFEST}", "wt", **storage_options) as f:
            f.write(text)
        return
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{MANIFEST}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / MANIFEST)
    finally:
        tmp.unlink(missing_ok=True)
    from pipeline.files import fsync_dir

    fsync_dir(directory)
