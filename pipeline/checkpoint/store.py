"""Where a run's checkpoints live: the local commit directory, and optionally a mirror on object storage.

Training always commits locally first (commit.py: atomic rename on a local or shared filesystem); with
`checkpoint.dir: s3://...` rank 0 then uploads each commit in the background (MANIFEST last, see
remote.py) and applies the same retention there. Resuming takes the newest commit that verifies from
either side; a remote one is downloaded into the local directory first, which makes it a local commit.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.checkpoint import commit
from pipeline.checkpoint.remote import RemoteStore, is_remote


class Store:
    def __init__(self, local: Path, remote_url: str | None = None, storage_options: dict | None = None):
        self.local = Path(local)
        self.remote = RemoteStore(remote_url, storage_options) if remote_url else None
        self._uploader: ThreadPoolExecutor | None = None
        self._uploads: list[tuple[Path, Future]] = []

    def describe(self) -> str:
        return f"{self.local}" + (f", mirrored to {self.remote.url}" if self.remote else "")

    def has_commits(self) -> bool:
        return bool(commit.committed(self.local)) or bool(self.remote and self.remote.committed())

    def remove_debris(self) -> None:
        """Rank 0, before any save of this run: partial local saves and partial uploads."""
        commit.remove_debris(self.local)
        if self.remote:
            self.remote.remove_debris()

    def newest_verified(self, warn: Callable[[str], None]) -> Path | None:
        """The newest commit whose files verify, local or remote (downloaded into the local dir); a bad
        one is skipped with a warning naming the bad file, falling back to the previous commit."""
        local = {c.name: c for c in commit.committed(self.local)}
        remote = set(self.remote.committed()) if self.remote else set()
        for name in sorted(set(local) | remote, reverse=True):
            if name in local:
                try:
                    commit.verify(local[name])
                    return local[name]
                except commit.CheckpointError as e:
                    warn(f"skipping checkpoint {name}: {e}")
            if name in remote:
                assert self.remote is not None
                try:
                    return self.remote.download(name, self.local)
                except commit.CheckpointError as e:
                    warn(f"skipping checkpoint {self.remote.url}/{name}: {e}")
        return None

    def publish(self, ckpt: Path, retention: commit.Retention) -> None:
        """Rank 0, after a local commit: upload it in the background, then apply retention on both sides."""
        if self.remote is None:
            return
        if self._uploader is None:
            self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-upload")
        self._uploads.append((ckpt, self._uploader.submit(self._upload, ckpt, retention)))

    def _upload(self, ckpt: Path, retention: commit.Retention) -> str:
        assert self.remote is not None
        try:
            url = self.remote.upload(ckpt)
            names = self.remote.committed()
            for name in commit.not_retained(names, self.remote.read_manifest, retention):
                self.remote.remove(name)
        finally:  # local retention after the upload, so it never deletes a commit being uploaded
            commit.apply_retention(self.local, retention)
        return url

    def finished_uploads(self, wait: bool = False) -> list[tuple[Path, str | None, str | None]]:
        """Uploads that ended since the last call: (local commit, remote URL or None, error or None)."""
        ended, still = [], []
        for ckpt, future in self._uploads:
            if wait or future.done():
                error = future.exception()
                ended.append((ckpt, None if error else future.result(), error and str(error)))
            else:
                still.append((ckpt, future))
        self._uploads = still
        return ended


def for_config(cfg: Any) -> Store:
    return Store(cfg.checkpoint_dir, cfg.checkpoint_remote, cfg.checkpoint.storage_options)


def resolve_path(target: str, store: Store) -> Path | None:
    """A checkpoint the user named (`resume=PATH`): a local checkpoint or run dir, or a remote commit
    (`s3://.../step_X`) or remote checkpoints prefix, downloaded into the store's local dir and
    verified. None if there is nothing committed there."""
    if not is_remote(target):
        return commit.find(Path(target))
    parent, _, name = target.rstrip("/").rpartition("/")
    if name.startswith("step_"):
        source = RemoteStore(parent, store.remote.storage_options if store.remote else None)
        return source.download(name, store.local)
    source = RemoteStore(target, store.remote.storage_options if store.remote else None)
    names = source.committed()
    return source.download(names[-1], store.local) if names else None
