"""RemoteStore against a real S3 API: moto's server on 127.0.0.1, real committed checkpoints in tmp dirs."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from pipeline.checkpoint import commit
from pipeline.checkpoint.remote import RemoteStore, is_remote
from pipeline.files import sha256_file
from pipeline.net import free_port


@pytest.fixture
def options(s3_endpoint: str) -> dict[str, Any]:
    return {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}


@pytest.fixture
def s3(options: dict[str, Any]):
    """An S3 client of our own, standing for another process or a person poking at the bucket."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **options)


@pytest.fixture
def bucket(s3) -> str:
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    s3.mkdir(name)
    return name


@pytest.fixture
def store(bucket: str, options: dict[str, Any]) -> RemoteStore:
    return RemoteStore(f"s3://{bucket}/run/checkpoints/", options)


def make_commit(root: Path, step: int, payload: bytes = b"weights", extra: bool = False) -> Path:
    """A committed checkpoint in commit.py's format: files (one in a subdirectory), then the MANIFEST."""
    ckpt = root / commit.step_dir_name(step)
    (ckpt / "engines" / "model").mkdir(parents=True)
    (ckpt / "engines" / "model" / "state.pt").write_bytes(payload * 100)
    (ckpt / commit.STATE_FILE).write_text(json.dumps({"step": step}))
    if extra:
        (ckpt / "engines" / "model" / "extra.bin").write_bytes(b"x" * 10)
    files = {
        str(p.relative_to(ckpt)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(ckpt.rglob("*"))
        if p.is_file()
    }
    manifest = {"format": commit.FORMAT, "step": step, "files": files}
    (ckpt / commit.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return ckpt


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("url", "expected"),
    [("s3://b/p", True), ("gs://b", True), ("file:///tmp/x", False), ("runs/x", False), (Path("/x"), False)],
)
def test_is_remote(url: str | Path, expected: bool) -> None:
    assert is_remote(url) is expected


def test_upload_download_round_trip_and_cache_reuse(store, tmp_path, monkeypatch) -> None:
    local = [make_commit(tmp_path / "local", step) for step in (100, 200)]
    urls = [store.upload(ckpt) for ckpt in local]
    assert urls == [f"{store.url}/step_00000100", f"{store.url}/step_00000200"]
    assert not store.url.endswith("/")
    assert store.committed() == ["step_00000100", "step_00000200"]
    assert store.read_manifest("step_00000200") == commit.read_manifest(local[1])

    cache = tmp_path / "cache"
    got = store.download("step_00000200", cache)
    assert got == cache / "step_00000200"
    assert tree(got) == tree(local[1])
    assert commit.verify(got)["step"] == 200
    assert sorted(p.name for p in cache.iterdir()) == ["step_00000200"]

    before = (got.stat().st_ino, (got / "engines/model/state.pt").stat().st_mtime_ns)
    gets = []
    real_get = store.fs.get
    monkeypatch.setattr(store.fs, "get", lambda *a, **k: gets.append(a) or real_get(*a, **k))
    assert store.download("step_00000200", cache) == got
    assert gets == []  # the cached copy matched the remote MANIFEST and verified
    assert (got.stat().st_ino, (got / "engines/model/state.pt").stat().st_mtime_ns) == before


def test_resave_replaces_remote_files_and_refreshes_cache(store, s3, tmp_path) -> None:
    store.upload(make_commit(tmp_path / "first", 100, extra=True))
    cache = tmp_path / "cache"
    assert (store.download("step_00000100", cache) / "engines/model/extra.bin").is_file()

    again = make_commit(tmp_path / "second", 100, payload=b"better")  # same step, saved again
    store.upload(again)
    assert not s3.exists(f"{store.url}/step_00000100/engines/model/extra.bin")
    assert tree(store.download("step_00000100", cache)) == tree(again)


def test_interrupted_upload_is_debris(store, s3, tmp_path) -> None:
    store.upload(make_commit(tmp_path, 100))
    assert store.committed() == ["step_00000100"]  # listed before the other process writes
    partial = make_commit(tmp_path, 200)
    (partial / commit.MANIFEST).unlink()  # the upload died before its commit marker
    s3.put(str(partial), f"{store.url}/step_00000200", recursive=True)
    assert s3.exists(f"{store.url}/step_00000200/engines/model/state.pt")

    assert store.committed() == ["step_00000100"]
    with pytest.raises(commit.CheckpointError, match="step_00000200/MANIFEST.json"):
        store.download("step_00000200", tmp_path / "cache")
    assert store.remove_debris() == ["step_00000200"]
    s3.invalidate_cache()
    assert not s3.exists(f"{store.url}/step_00000200")
    assert store.committed() == ["step_00000100"]
    assert store.remove_debris() == []


def test_corrupt_remote_file_is_refused(store, s3, tmp_path) -> None:
    store.upload(make_commit(tmp_path, 100))
    s3.pipe_file(f"{store.url}/step_00000100/engines/model/state.pt", b"W" * 700)  # same size, other bytes
    cache = tmp_path / "cache"
    with pytest.raises(commit.CheckpointError, match=r"engines/model/state\.pt.*sha256"):
        store.download("step_00000100", cache)
    assert list(cache.iterdir()) == []  # no .tmp-* debris, no half-made commit


def test_upload_refuses_files_the_manifest_does_not_list(store, tmp_path) -> None:
    ckpt = make_commit(tmp_path, 100)
    (ckpt / "stray.bin").write_bytes(b"?")
    with pytest.raises(commit.CheckpointError, match="stray.bin"):
        store.upload(ckpt)
    with pytest.raises(commit.CheckpointError, match="is not a committed checkpoint"):
        store.upload(tmp_path / "nothing")
    assert store.committed() == []


def test_remove_deletes_the_commit(store, s3, tmp_path) -> None:
    for step in (100, 200):
        store.upload(make_commit(tmp_path, step))
    store.remove("step_00000100")
    assert store.committed() == ["step_00000200"]
    s3.invalidate_cache()
    assert not s3.exists(f"{store.url}/step_00000100")
    store.remove("step_00000100")  # already gone: nothing to do


def test_remove_cut_short_leaves_debris_not_a_commit(store, tmp_path, monkeypatch) -> None:
    store.upload(make_commit(tmp_path, 100))

    def network_gone(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("network gone")

    monkeypatch.setattr(store.fs, "rm", network_gone)  # the MANIFEST went, the files did not
    with pytest.raises(commit.CheckpointError, match="network gone"):
        store.remove("step_00000100")
    monkeypatch.undo()
    assert store.committed() == []
    assert store.remove_debris() == ["step_00000100"]


def test_missing_prefix_has_no_commits(bucket, options) -> None:
    store = RemoteStore(f"s3://{bucket}/never/written", options)
    assert store.committed() == []
    assert store.remove_debris() == []


def test_missing_bucket_or_endpoint_names_storage_options(options, tmp_path) -> None:
    missing = RemoteStore("s3://no-such-bucket-here/ckpt", options)
    for call in (missing.committed, lambda: missing.upload(make_commit(tmp_path, 1))):
        with pytest.raises(commit.CheckpointError, match=r"no-such-bucket-here.*checkpoint\.storage_options"):
            call()

    port = free_port()  # a port nobody listens on
    # one attempt: botocore's retries would spend seconds on a refused connection
    fast = {"retries": {"max_attempts": 1}, "connect_timeout": 1}
    unreachable = {**options, "endpoint_url": f"http://127.0.0.1:{port}", "config_kwargs": fast}
    with pytest.raises(commit.CheckpointError, match=r"s3://ckpt/run.*checkpoint\.storage_options"):
        RemoteStore("s3://ckpt/run", unreachable).committed()
