"""A traversal MANIFEST in a bucket (a real S3 API: moto's server on 127.0.0.1): a commit someone else
uploaded whose MANIFEST names `../escape`, `../../escape` and an absolute path, each with the right size
and sha256, so integrity checks alone would pass it. Nothing may be written outside the cache dir, and
the commit is never a resume point: `resume=auto` sets it aside with a warning naming the entry, and
`resume=` that URL is refused (exit 2 from the CLI)."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest

from pipeline.checkpoint import commit, store
from pipeline.checkpoint.remote import RemoteStore
from tests.helpers import run_cli
from tests.unit.test_remote_store import make_commit

pytestmark = pytest.mark.faults

EVIL = b"written by whoever owns the bucket"


def upload_traversal_commit(s3, prefix: str, step: int, outside: Path) -> None:
    """Upload `prefix/step_X/` by hand: one legit file and three escaping ones (at the literal keys the
    MANIFEST names, so a download that trusted the names would fetch and write them), MANIFEST last."""
    name = commit.step_dir_name(step)
    escaping = ["../escape", "../../escape", str(outside / "abs-path")]
    files = {}
    for rel in ["engines/model/state.pt", *escaping]:
        s3.pipe_file(f"{prefix}/{name}/{rel}", EVIL)
        files[rel] = {"bytes": len(EVIL), "sha256": hashlib.sha256(EVIL).hexdigest()}
    manifest = {"format": commit.FORMAT, "step": step, "files": files}
    s3.pipe_file(f"{prefix}/{name}/{commit.MANIFEST}", json.dumps(manifest).encode())
    s3.invalidate_cache()


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def bucket_with_traversal(tmp_path, s3_endpoint):
    import s3fs

    options = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}
    s3 = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    bucket = f"trust-{uuid.uuid4().hex[:12]}"
    s3.mkdir(bucket)
    url = f"s3://{bucket}/run/checkpoints"
    good = make_commit(tmp_path / "elsewhere", 100)  # a commit that is what it says, uploaded normally
    RemoteStore(url, options).upload(good)
    outside = tmp_path / "outside"
    outside.mkdir()
    upload_traversal_commit(s3, f"{bucket}/run/checkpoints", 200, outside)
    cache = tmp_path / "run" / "checkpoints"
    cache.mkdir(parents=True)
    return url, options, cache


@pytest.mark.timeout(120)
def test_resume_auto_sets_a_traversal_commit_aside_and_writes_nothing_outside(
    tmp_path, bucket_with_traversal
):
    url, options, cache = bucket_with_traversal
    before = files_under(tmp_path) - files_under(cache)
    warnings: list[str] = []
    chosen = store.Store(cache, url, options).newest_verified(warn=warnings.append)

    assert chosen == cache / "step_00000100"  # the traversal commit is newer, but never chosen
    assert len(warnings) == 1, warnings
    assert f"{url}/step_00000200/{commit.MANIFEST}" in warnings[0]  # names the MANIFEST ...
    assert "'../escape'" in warnings[0] and "'..' component" in warnings[0]  # ... and the entry
    assert files_under(tmp_path) - files_under(cache) == before  # nothing new outside the cache dir
    assert not (tmp_path / "outside" / "abs-path").exists() and not (tmp_path / "escape").exists()
    assert sorted(p.name for p in cache.iterdir()) == ["step_00000100"]  # no escape, no .tmp debris


@pytest.mark.timeout(120)
def test_resume_from_the_traversal_commit_is_refused_naming_the_entry(tmp_path, bucket_with_traversal):
    url, options, cache = bucket_with_traversal
    with pytest.raises(commit.CheckpointError, match=r"entry '\.\./escape' is not a plain relative path"):
        store.resolve_path(f"{url}/step_00000200", store.Store(cache, url, options))
    assert not (tmp_path / "outside" / "abs-path").exists() and not (tmp_path / "escape").exists()
    assert sorted(p.name for p in cache.iterdir()) == []


@pytest.mark.timeout(300)
def test_cli_resume_from_a_traversal_commit_exits_2_before_anything_starts(
    digits_dir, tmp_path, bucket_with_traversal, s3_endpoint
):
    url, _, cache = bucket_with_traversal
    run_dir = cache.parent
    proc = run_cli(
        "train",
        "configs/smoke.yaml",
        "cluster.launcher=local",
        f"data.train={digits_dir}",
        f"run_dir={run_dir}",
        f"checkpoint.dir={url}",
        f"checkpoint.storage_options={{key: testing, secret: testing, endpoint_url: {s3_endpoint}}}",
        f"resume={url}/step_00000200",
        "--dry-run",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: config key 'resume'" in proc.stderr and "'../escape'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "outside" / "abs-path").exists() and not (tmp_path / "escape").exists()
