"""Text as token shards (`pipeline data prepare text:PATH | text-stdlib`): the shards give back each
split's exact text, the vocabularies, non-UTF-8 input, and the inputs that are refused (exit 2)."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.data import shards, text
from pipeline.data.decode import Decoder
from pipeline.vocab import Vocab, VocabError
from tests.conftest import stdlib_text
from tests.helpers import run_cli


def _windows(directory, split):
    """{offset: tokens} of every window of a split, read straight from its tars."""
    manifest = shards.read_manifest(directory)
    found = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(directory / shard["name"]) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                assert ext == "npy"
                found[int(key.rsplit("-", 1)[1])] = np.load(io.BytesIO(tar.extractfile(member).read()))
    return found


def test_vocabularies_encode_and_decode_exactly():
    vocab = Vocab.of_text("hello, world\n")
    assert vocab.symbols == tuple(sorted(set("hello, world\n"))) and vocab.dtype == np.uint8
    assert vocab.decode(vocab.encode("low, world")) == "low, world"
    with pytest.raises(VocabError, match=r"'z', 'é'"):
        vocab.encode("zé")
    data = "naïve €".encode() + b"\xff\xfe"  # not UTF-8 at the end
    assert Vocab.bytes().decode_bytes(Vocab.bytes().encode(data)) == data
    assert Vocab.from_manifest("char", list(vocab.symbols)) == vocab
    with pytest.raises(VocabError, match="single characters"):
        Vocab.from_manifest("char", ["ab", "c"])
    with pytest.raises(VocabError, match="unknown vocabulary"):
        Vocab.from_manifest("words", [])


def test_windows_cover_each_split_and_the_tail_and_never_cross_the_split():
    assert text.window_starts(10, 3) == [0, 3, 6]  # 6 + 4 = 10: the tail is covered exactly
    assert text.window_starts(11, 3) == [0, 3, 6, 7]  # the last window ends at the split's end
    assert text.minimum_tokens(32, 0.1) == 330  # round(330 * 0.1) = 33 val tokens: one window each


def test_stdlib_text_round_trips_through_its_shards(tmp_path):
    out = tmp_path / "stdlib"
    manifest = text.write_text_prepared(text.load_text_source("text-stdlib"), out, seq_len=128)
    source = text.load_text_source("text-stdlib").data
    assert 400_000 < len(source.decode()) < 600_000  # "about 465,000 characters"
    train, val = text.split_text(out, "train"), text.split_text(out, "val")
    assert train + val == source  # the exact source, split by one contiguous cut
    assert len(val.decode()) == manifest["splits"]["val"]["tokens"] == round(len(source.decode()) * 0.1)
    assert manifest["kind"] == "tokens" and manifest["vocab"] == "char" and manifest["sample_shape"] == [129]
    assert manifest["num_classes"] == len(set(source.decode())) == len(manifest["classes"])
    assert manifest["text"]["sha256"] == __import__("hashlib").sha256(source).hexdigest()
    assert shards.inspect_prepared(out) == []
    windows = _windows(out, "val")
    assert all(len(w) == 129 and w.dtype == np.uint8 for w in windows.values())


def test_a_directory_and_a_glob_are_their_txt_files_in_sorted_order(tmp_path):
    words = stdlib_text(6000)
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "b.txt").write_text(words[2000:4000])
    (tmp_path / "docs" / "a.txt").write_text(words[:2000])
    (tmp_path / "docs" / "sub" / "c.txt").write_text(words[4000:])
    (tmp_path / "docs" / "notes.md").write_text("not text input")
    for source in (f"text:{tmp_path / 'docs'}", f"text:{tmp_path / 'docs'}/**/*.txt"):
        out = tmp_path / f"out{len(source)}"
        text.write_text_prepared(text.load_text_source(source), out, seq_len=16)
        assert (text.split_text(out, "train") + text.split_text(out, "val")).decode() == words


def test_non_utf8_text_is_refused_for_a_char_vocabulary_and_kept_exactly_as_bytes(tmp_path):
    data = stdlib_text(3000).encode("latin-1", errors="replace") + "café".encode("latin-1") * 50
    (tmp_path / "latin1.txt").write_bytes(data)
    proc = run_cli("data", "prepare", f"text:{tmp_path / 'latin1.txt'}", "--out", str(tmp_path / "c"))
    assert proc.returncode == 2
    assert "latin1.txt is not UTF-8 text (byte 3003" in proc.stderr and "--vocab byte" in proc.stderr
    assert not (tmp_path / "c").exists()
    out = tmp_path / "b"
    manifest = text.write_text_prepared(
        text.load_text_source(f"text:{tmp_path / 'latin1.txt'}"), out, seq_len=16, vocab="byte"
    )
    assert manifest["vocab"] == "byte" and manifest["num_classes"] == 256
    assert text.split_text(out, "train") + text.split_text(out, "val") == data


def test_empty_and_too_short_text_exit_2_naming_the_file_and_the_minimum(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("x" * 300)
    empty = run_cli("data", "prepare", f"text:{tmp_path / 'empty.txt'}", "--out", str(tmp_path / "e"))
    assert empty.returncode == 2 and "empty.txt is empty" in empty.stderr
    assert "at least 1290 characters" in empty.stderr  # --seq-len 128, --val-fraction 0.1
    short = run_cli(
        "data", "prepare", f"text:{tmp_path / 'short.txt'}", "--out", str(tmp_path / "s"), "--seq-len", "32"
    )
    assert short.returncode == 2
    assert "short.txt holds 300 characters" in short.stderr and "at least 330 characters" in short.stderr
    assert not (tmp_path / "e").exists() and not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match="no such file"):
        text.load_text_source(f"text:{tmp_path / 'missing.txt'}")


def test_token_windows_decode_as_int64_and_an_id_outside_the_vocabulary_is_a_bad_sample(text_dir):
    spec = shards.resolve(str(text_dir), None)
    assert spec.kind == "tokens" and spec.vocab == "char" and spec.sample_shape == [33]
    decoder = Decoder(spec, None, 0)
    window = np.arange(33, dtype=np.uint8) % spec.num_classes
    buf = io.BytesIO()
    np.save(buf, window)
    x, y = decoder({"__key__": "k", "__url__": "u", "npy": buf.getvalue()}, 0)
    assert x.dtype == torch.int64 and x.tolist() == window.tolist() and y == -1
    bad = window.copy()
    bad[5] = spec.num_classes  # past the vocabulary: would index past the model's embedding
    buf = io.BytesIO()
    np.save(buf, bad)
    with pytest.raises(ValueError, match=rf"'k' in shard u: token {spec.num_classes} is outside"):
        decoder.decode({"__key__": "k", "__url__": "u", "npy": buf.getvalue()})


def test_a_manifest_with_a_broken_vocabulary_is_refused(text_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(text_dir, copy)
    manifest = json.loads((copy / "MANIFEST.json").read_text())
    manifest["classes"][0] = "ab"
    (copy / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(shards.DataError, match="data.train.*single characters"):
        shards.resolve(str(copy), None)
