"""Text as token shards: `pipeline data prepare text:PATH | text-stdlib --seq-len L [--vocab char|byte]`.

    text:PATH     a file, a directory (its *.txt files, recursively, in sorted path order) or a glob;
                  the source text is the files' bytes concatenated in that order
    text-stdlib   the English documentation text inside every CPython (`pydoc_data/topics.py`, ~465,000
                  characters): its topics' texts concatenated in sorted topic order; no download

The text is split by contiguous blocks: train is the first 1 - val_fraction of it, val the rest, so no
window holds text of both. Each split is cut into windows of L + 1 tokens (the input is the first L,
the next-token targets the last L) starting every L tokens; a last window ending at the split's end
covers its tail, overlapping the one before. A window is one `.npy` sample (unsigned ints, the
vocabulary's smallest dtype) keyed `<source>-<offset in its split>`, so the shards give back each
split's exact text (`split_text`). Train windows are shuffled across shards (seeded): the stream only
shuffles within a buffer. The MANIFEST records kind "tokens", the vocabulary (`vocab`, and for "char"
its symbols as `classes`: token i is classes[i]), `seq_len`, and the source's sha256 and size.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ConfigError
from pipeline.data.manifest import FORMAT, MANIFEST, read_manifest
from pipeline.data.shards import _add_member, check_out, publish, sample_key
from pipeline.files import fsync_tree, sha256_file
from pipeline.vocab import KINDS, Vocab, VocabError

TEXT_STDLIB = "text-stdlib"
DEFAULT_VAL_FRACTION = 0.1


@dataclass
class TextSource:
    name: str  # the source as the MANIFEST names it (and sample keys start with)
    data: bytes  # the exact source text
    where: str  # what the user gave (a file, a dir, a glob), for messages
    files: list[tuple[str, int]]  # (path, bytes) of each file read, in order


def is_text_source(spec: str) -> bool:
    return spec == TEXT_STDLIB or spec.startswith("text:")


def load_text_source(spec: str) -> TextSource:
    if spec == TEXT_STDLIB:
        import pydoc_data.topics  # part of CPython's standard library

        topics = pydoc_data.topics.topics
        data = "".join(topics[key] for key in sorted(topics)).encode("utf-8")
        return TextSource(
            TEXT_STDLIB, data, pydoc_data.topics.__file__, [(pydoc_data.topics.__file__, len(data))]
        )
    pattern = spec.removeprefix("text:")
    if not pattern:
        raise ConfigError("text:PATH needs a path: a .txt file, a directory of .txt files, or a glob")
    path = Path(pattern)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ConfigError(f"text:{pattern}: the directory holds no .txt files")
    else:
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not files:
            raise ConfigError(f"text:{pattern}: no such file or directory, and no file matches it as a glob")
    parts = [f.read_bytes() for f in files]
    stem = (path.stem if path.is_file() else path.name) or "text"
    name = "text-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)
    return TextSource(
        name, b"".join(parts), pattern, [(str(f), len(p)) for f, p in zip(files, parts, strict=True)]
    )


def _as_text(source: TextSource) -> str:
    """The source as characters; a file that is not UTF-8 is named with the offset of its first bad byte."""
    start = 0
    for path, size in source.files:
        chunk = source.data[start : start + size]
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{path} is not UTF-8 text (byte {e.start}: {chunk[e.start : e.start + 4]!r}): a char "
                "vocabulary needs UTF-8; prepare it with --vocab byte (256 byte tokens, any encoding)"
            ) from None
        start += size
    return source.data.decode("utf-8")


def minimum_tokens(seq_len: int, val_fraction: float) -> int:
    """The fewest tokens whose split gives each split one window of seq_len + 1."""
    need = seq_len + 1
    n = max(need, math.ceil(need / val_fraction), math.ceil(need / (1.0 - val_fraction)))
    while not (_val_size(n, val_fraction) >= need and n - _val_size(n, val_fraction) >= need):
        n += 1
    return n


def _val_size(n: int, val_fraction: float) -> int:
    return round(n * val_fraction)


def window_starts(n: int, seq_len: int) -> list[int]:
    """Offsets of the windows of seq_len + 1 tokens over n tokens: every seq_len, and one at the end
    when those miss the tail."""
    starts = list(range(0, n - seq_len, seq_len))
    if starts[-1] + seq_len + 1 < n:
        starts.append(n - seq_len - 1)
    return starts


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _write_windows(
    out: Path, split: str, name: str, tokens: np.ndarray, starts: list[int], *, seq_len: int, per_shard: int
) -> list[dict[str, Any]]:
    """Shards of `per_shard` windows each, in the order of `starts`."""
    shards = []
    for first in range(0, len(starts), per_shard):
        shard = f"{split}-{len(shards):06d}.tar"
        chunk = starts[first : first + per_shard]
        with tarfile.open(out / shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for start in chunk:
                window = np.ascontiguousarray(tokens[start : start + seq_len + 1])
                _add_member(tar, f"{sample_key(name, start)}.npy", _npy(window))
        path = out / shard
        shards.append(
            {"name": shard, "samples": len(chunk), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        )
    return shards


def write_text_prepared(
    source: TextSource,
    out: Path,
    *,
    seq_len: int = 128,
    vocab: str = "char",
    samples_per_shard: int = 128,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the token shards and MANIFEST of `source` into `out` (atomically, as write_prepared)."""
    if vocab not in KINDS:
        raise ConfigError(f"--vocab {vocab!r}: use one of {', '.join(KINDS)}")
    if seq_len < 1:
        raise ConfigError(f"--seq-len must be >= 1, not {seq_len}")
    if samples_per_shard <= 0:
        raise ConfigError("--samples-per-shard must be > 0")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(
            f"--val-fraction must be in (0, 1) for text (a val split is needed), not {val_fraction}"
        )
    if vocab == "byte":
        symbols = Vocab.bytes()
        tokens = symbols.encode(source.data)
    else:
        text = _as_text(source)
        symbols = Vocab.of_text(text)
        tokens = symbols.encode(text)
    unit = "bytes" if vocab == "byte" else "characters"
    minimum = minimum_tokens(seq_len, val_fraction)
    if len(tokens) < minimum:
        what = "is empty" if len(tokens) == 0 else f"holds {len(tokens)} {unit}"
        raise ConfigError(
            f"text source {source.where} {what}; with --seq-len {seq_len} and --val-fraction {val_fraction} "
            f"each split needs a window of {seq_len + 1} tokens, so the text needs at least {minimum} {unit} "
            "(give more text, or a smaller --seq-len)"
        )
    out = Path(out)
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    split_at = len(tokens) - _val_size(len(tokens), val_fraction)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "source": source.name,
        "seed": seed,
        "val_fraction": val_fraction,
        "kind": "tokens",
        "vocab": vocab,
        "classes": list(symbols.symbols),
        "num_classes": len(symbols),
        "seq_len": seq_len,
        "channels": 1,
        "sample_shape": [seq_len + 1],  # a window: the input is [:-1], the next-token targets [1:]
        "normalize": {"mean": [0.0], "std": [1.0]},
        "label_type": None,
        "text": {
            "files": [path for path, _ in source.files][:100],
            "file_count": len(source.files),
            "bytes": len(source.data),
            "sha256": hashlib.sha256(source.data).hexdigest(),
            "tokens": len(tokens),
            "val_starts_at_token": split_at,
        },
        "splits": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        rng = np.random.default_rng(seed)
        for split, part in (("train", tokens[:split_at]), ("val", tokens[split_at:])):
            starts = window_starts(len(part), seq_len)
            if split == "train":
                starts = [starts[i] for i in rng.permutation(len(starts))]
            shards = _write_windows(
                tmp, split, source.name, part, starts, seq_len=seq_len, per_shard=samples_per_shard
            )
            manifest["splits"][split] = {"samples": len(starts), "tokens": len(part), "shards": shards}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        fsync_tree(tmp)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def split_text(directory: Path, split: str) -> bytes:
    """A split's exact source text, put back together from its shards' windows (each at the offset its
    key names): what `prepare` read, as bytes (a char vocabulary: UTF-8)."""
    manifest = read_manifest(directory)
    vocab = Vocab.from_manifest(manifest.get("vocab"), manifest["classes"])
    info = manifest["splits"][split]
    tokens = np.zeros(info["tokens"], dtype=np.int64)
    covered = np.zeros(info["tokens"], dtype=bool)
    for shard in info["shards"]:
        with tarfile.open(Path(directory) / shard["name"]) as tar:
            for member in tar:
                offset = int(member.name.split(".", 1)[0].rsplit("-", 1)[1])
                window = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
                tokens[offset : offset + len(window)] = window
                covered[offset : offset + len(window)] = True
    if not covered.all():
        raise VocabError(f"{directory}: the {split} windows leave tokens uncovered")
    return vocab.decode_bytes(tokens)
