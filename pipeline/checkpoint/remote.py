"""Committed checkpoints mirrored to object storage (`s3://bucket/prefix`, any fsspec URL).

    s3://bucket/prefix/step_00000100/...           the files of a local commit, uploaded first
    s3://bucket/prefix/step_00000100/MANIFEST.json  uploaded last: the remote commit marker

Object stores have no atomic directory rename, so the MANIFEST plays its part: a `step_*` prefix
without one is debris of an interrupted upload (or delete), never listed and never loaded. Loading
downloads into a local cache and runs the same `commit.verify` as a local resume. A bucket is as
untrusted as any directory: a MANIFEST naming a file outside its commit (`../x`, `/abs`) is refused
before anything is downloaded (commit.parse_manifest), so `resume=auto` sets that commit aside.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec  # cheap; the s3fs/gcsfs backend is imported only when a store is built

from pipeline.checkpoint.commit import (
    MANIFEST,
    CheckpointError,
    parse_manifest,
    read_manifest,
    step_dir_name,
    verify,
)
from pipeline.files import confined

_HINT = "check checkpoint.storage_options (endpoint_url, key, secret) and that the bucket exists"


def is_remote(url: str | Path) -> bool:
    if isinstance(url, Path):  # never remote: pathlib has already folded "s3://b" into "s3:/b"
        return False
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", url) is not None and not url.startswith("file://")


class RemoteStore:
    """One writer at a time: upload/remove/remove_debris run on rank 0 only, as local commits do."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.storage_options = dict(storage_options or {})
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except ImportError as e:  # s3fs is the optional extra `pipeline[s3]`
            raise CheckpointError(f"checkpoint store {self.url}: {e}") from None
        self.root = self.root.rstrip("/")

    @contextmanager
    def _storage(self, doing: str) -> Iterator[None]:
        # backends raise their own types (botocore's are not OSError); users need the URL and the knob
        try:
            yield
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{doing} {self.url} failed ({type(e).__name__}: {e}); {_HINT}") from e

    def _check_bucket(self) -> None:
        # a missing bucket must not pass for "no checkpoints yet": resume=auto would restart from step 0
        bucket = self.root.split("/", 1)[0] or "/"
        try:
            self.fs.info(bucket)
        except FileNotFoundError:
            raise CheckpointError(f"{self.url}: bucket {bucket!r} not found; {_HINT}") from None

    def _step_prefixes(self) -> list[str]:
        self.fs.invalidate_cache()  # another process may have uploaded since our last listing
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            self._check_bucket()
            return []
        names = (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")
        return sorted(n for n in names if n.startswith("step_"))

    def _has_manifest(self, name: str) -> bool:
        return self.fs.exists(f"{self.root}/{name}/{MANIFEST}")

    def committed(self) -> list[str]:
        """Names of the remote commits (with a MANIFEST), oldest first. Verification is separate."""
        with self._storage("listing"):
            return [name for name in self._step_prefixes() if self._has_manifest(name)]

    def remove_debris(self) -> list[str]:
        """Delete `step_*` prefixes without a MANIFEST (uploads that died before their commit)."""
        with self._storage("cleaning"):
            debris = [name for name in self._step_prefixes() if not self._has_manifest(name)]
            for name in debris:
                self.fs.rm(f"{self.root}/{name}", recursive=True)
        return debris

    def remove(self, name: str) -> None:
        with self._storage(f"deleting {name} from"):
            # the marker goes first, so a delete cut short leaves debris, never a commit missing files
            if self._has_manifest(name):
                self.fs.rm_file(f"{self.root}/{name}/{MANIFEST}")
            if self.fs.exists(f"{self.root}/{name}"):
                self.fs.rm(f"{self.root}/{name}", recursive=True)

    def _fetch_manifest(self, name: str) -> tuple[bytes, dict[str, Any]]:
        url = f"{self.url}/{name}/{MANIFEST}"
        with self._storage(f"reading {name} from"):
            try:
                data = self.fs.cat_file(f"{self.root}/{name}/{MANIFEST}")
            except FileNotFoundError:
                raise CheckpointError(f"{url}: not a committed checkpoint ({MANIFEST} is missing)") from None
        return data, parse_manifest(data, url)  # refuses names that would leave the cache dir

    def read_manifest(self, name: str) -> dict[str, Any]:
        return self._fetch_manifest(name)[1]

    def upload(self, local_commit: Path) -> str:
        """Mirror a committed local checkpoint; returns its remote URL."""
        local = Path(local_commit)
        manifest = read_manifest(local)
        listed = {rel: entry["bytes"] for rel, entry in manifest["files"].items()}
        # same rule as commit._file_table: a file the MANIFEST does not list would never be verified
        present = {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and p.name != MANIFEST}
        if present != set(listed):
            odd = sorted(present ^ set(listed))
            raise CheckpointError(f"{local}: files not as its {MANIFEST} lists them: {odd}")
        name = step_dir_name(manifest["step"])
        dest = f"{self.root}/{name}"
        with self._storage(f"uploading {local} to"):
            self._check_bucket()
            self.remove(name)  # a re-save of the same step must not keep files of the old one
            if listed:
                self.fs.put([str(local / rel) for rel in listed], [f"{dest}/{rel}" for rel in listed])
            self.fs.invalidate_cache()
            found = self.fs.find(dest, detail=True).values()
            if {f["name"][len(dest) + 1 :]: f["size"] for f in found} != listed:  # stays debris
                raise CheckpointError(f"{self.url}/{name}: uploaded files differ from {MANIFEST}")
            self.fs.pipe_file(f"{dest}/{MANIFEST}", (local / MANIFEST).read_bytes())
        return f"{self.url}/{name}"

    def download(self, name: str, cache_root: Path) -> Path:
        """`cache_root/name`, verified; reused when its MANIFEST matches the remote one. One process per
        cache_root at a time (e.g. local rank 0, then a barrier): `.tmp-<name>` is not shared."""
        cache_root = Path(cache_root)
        final, tmp = cache_root / name, cache_root / f".tmp-{name}"
        raw, manifest = self._fetch_manifest(name)
        if (final / MANIFEST).is_file() and (final / MANIFEST).read_bytes() == raw:
            try:
                verify(final)
                return final
            except CheckpointError:
                pass  # torn (we do not fsync the cache) or tampered with: download again
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            files = list(manifest["files"])
            # parse_manifest refused any name that is not plain; `confined` also checks where it lands
            where = f"{self.url}/{name}/{MANIFEST}"
            targets = [confined(tmp, rel, where=where, error=CheckpointError) for rel in files]
            for target in targets:
                target.parent.mkdir(parents=True, exist_ok=True)
            with self._storage(f"downloading {name} from"):
                if files:
                    self.fs.get([f"{self.root}/{name}/{rel}" for rel in files], [str(t) for t in targets])
            # the MANIFEST we compared is the one we verify against, even if a re-upload races us
            (tmp / MANIFEST).write_bytes(raw)
            verify(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        return final
