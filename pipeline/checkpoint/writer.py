"""Write checkpoint files off the training thread: stage, then write + hash + fsync in the background.

Every tensor of a state dict is copied into staging buffers that are allocated once and reused by every
later save (fresh allocations page-fault at ~0.3 GB/s here; copies into touched memory run at ~7-10
GB/s). Tensors that only an optimizer step changes (the caller names their storages: trainable weights,
optimizer moments, fp32 masters) are copied by a staging thread while the loop runs its next forward and
backward; `wait_staged` (called by Engine.step before any weight changes) waits for those copies. All
other tensors (module buffers such as BatchNorm statistics, which a forward changes; frozen weights) are
copied before `submit` returns. On GPU the copies are queued on the current stream (non-blocking, into
pinned memory), so every later kernel, the optimizer step's included, runs after them: there a
CUDA event is all the writer waits for. Once staged, a writer thread `torch.save`s the staged copy into a file
object of ours (`_HashingFile`) that hashes each piece as torch hands it over and writes it with
`os.write` straight from the staging buffer: one copy into the page cache, no re-read for the hash,
then fsync. The hash is xxh3_128 (files.xxh3_128, ~11 GB/s on one core, sha256 ~1.2-1.45 GB/s): it
detects corruption; trust is not its job (see commit.py). Measured by `pipeline bench checkpoint`.

Written by hand because torch.distributed.checkpoint's async save needs its own on-disk format, and
DeepSpeed must be able to load what we write with its own loader.
"""

from __future__ import annotations

import copy
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.files import fsync_dir, xxh3_128

# The MANIFEST field of the digests this writer computes (commit.py also reads the older "sha256").
HASH = "xxh3_128"
_IMMUTABLE = (int, float, str, bytes, bool, type(None), torch.dtype, torch.device)


@dataclass
class FileRecord:
    bytes: int
    digest: str  # HASH of the file's bytes, hex
    write_s: float = 0.0  # torch.save into the page cache, hashing included (for the bench)
    fsync_s: float = 0.0


@dataclass
class _Save:
    root: Path
    staged: list[tuple[Any, Path, str]] = field(default_factory=list)  # until start_writes()
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # deferred (dst, src)
    copied: Future | None = None  # the staging thread's job: copies, writes queued, files sealed
    copies_done: threading.Event = field(default_factory=threading.Event)
    gpu_copies: Any = None  # a CUDA event after the device-to-host copies
    sealing: list[Path] | None = None  # this process's own small files (see `seal`)
    sealed: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (bytes, mtime_ns) sealed
    futures: list[Future] = field(default_factory=list)
    records: dict[str, FileRecord] = field(default_factory=dict)
    error: BaseException | None = None


class BackgroundWriter:
    """One per process. `begin(root)`, then `submit(state_dict, path)` per file (called by the engine's
    checkpoint hook), `start_writes()` once all are staged, then `wait()` for the file table of
    everything written under root."""

    def __init__(self) -> None:
        self._staging: dict[str, list[torch.Tensor]] = {}
        # Two files in flight: a rank writes a model file and an optimizer file per engine, and the
        # fsync of one overlaps the serialising of the other (hashing and os.write release the GIL).
        self._writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckpt-write")
        self._stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-stage")
        self._save: _Save | None = None
        self._later: list[Future] = []
        self._crc_lock = threading.Lock()
        self._writing = 0
        self._crc_before = True

    def begin(self, root: Path) -> None:
        assert self._save is None or self.done(), "a checkpoint write is still in flight"
        self._save = _Save(Path(root))

    def submit(self, state_dict: Any, path: str | Path, deferred: frozenset[int] = frozenset()) -> None:
        """Stage `state_dict` and queue its write to `path`, which must lie under the root given to
        `begin`. Tensors whose storage (`untyped_storage().data_ptr()`) is in `deferred` are copied by
        the staging thread: the caller must not change them before `wait_staged()`; every other tensor
        is copied before this returns."""
        save = self._save
        assert save is not None, "begin() first"
        key = str(Path(path).relative_to(save.root))
        buffers = self._staging.setdefault(key, [])
        staged = _stage(state_dict, buffers, iter(range(1 << 62)), deferred, save.copies)
        if any(b.is_pinned() for b in buffers):
            save.gpu_copies = torch.cuda.Event()
            save.gpu_copies.record()  # after the non-blocking device-to-host copies on this stream
        save.staged.append((staged, Path(path), key))

    def start_writes(self) -> None:
        """Start the deferred copies, then queue the writes of the files staged so far (on the staging
        thread, once its copies are done). Called once every file is submitted (commit.start, after
        every engine's save): a write running beside the staging copies competes for the same cores
        and memory bandwidth (on 2 cores it made staging 2-3x slower, `pipeline bench checkpoint`)."""
        save = self._save
        if save is None or save.copied is not None or not (save.staged or save.sealing is not None):
            return
        files, copies = list(save.staged), list(save.copies)
        save.staged.clear()
        save.copies.clear()
        save.copied = self._stager.submit(self._background, copies, files, save)

    def seal(self, paths: list[Path]) -> None:
        """Hash and fsync `paths` in the background, once this save's own writes are done, then fsync
        every directory under root (their entries: the commit's rename must not name a directory
        whose files may vanish in a crash). For small files this process has finished writing itself
        (the state file, DeepSpeed's metadata): otherwise the commit would read, hash and fsync them on
        the loop's time. Call before `start_writes`. A file changed after it was sealed is dropped from
        the records (`wait`), so the commit hashes it again."""
        assert self._save is not None and self._save.copied is None, "seal() before start_writes()"
        self._save.sealing = list(paths)

    def wait_staged(self) -> None:
        """Block until the deferred copies of the save in flight are done: from then on the loop may
        change every tensor it saved. Called before each optimizer step (Engine.step)."""
        save = self._save
        if save is not None and save.copied is not None:
            save.copies_done.wait()  # set by _background, also when it fails

    def done(self) -> bool:
        """Whether every queued file is written (or failed). Local: callers agree across ranks."""
        save = self._save
        if save is None:
            return True
        if save.staged or (save.sealing is not None and save.copied is None):
            return False
        if save.copied is not None and not save.copied.done():
            return False
        return all(f.done() for f in save.futures)

    def wait(self) -> tuple[dict[str, FileRecord], BaseException | None]:
        """Block until every queued file is written; (records by path relative to root, first error)."""
        save = self._save
        if save is None:
            return {}, None
        self.start_writes()  # files still staged (no start_writes yet) are written now
        if save.copied is not None:
            save.copied.result()  # its writes are queued once the copies are done; never raises
        for future in save.futures:
            future.result()  # _write records errors itself and never raises
        self._save = None
        for key, (size, mtime_ns) in save.sealed.items():
            try:
                st = os.stat(save.root / key)
                changed = (st.st_size, st.st_mtime_ns) != (size, mtime_ns)
            except OSError:
                changed = True
            if changed:  # written again after it was sealed: the commit reads it itself
                save.records.pop(key, None)
        return save.records, save.error

    def later(self, fn: Any, *args: Any) -> None:
        """Run `fn(*args)` on the writer thread, after the files queued so far (e.g. deleting old
        commits: it frees disk space before the next save writes, and keeps the unlinks off the loop)."""
        self._later = [f for f in self._later if not f.done()]
        self._later.append(self._writer.submit(fn, *args))

    def wait_idle(self) -> None:
        """Block until the files and `later` jobs submitted so far have run."""
        self.wait()
        for future in self._later:
            future.result()

    def close(self) -> None:
        self._stager.shutdown(wait=True)  # first: it may still queue writes
        self._writer.shutdown(wait=True)

    def _background(
        self, copies: list[tuple[torch.Tensor, torch.Tensor]], files: list[tuple[Any, Path, str]], save: _Save
    ) -> None:
        """The staging thread's part of a save: the deferred copies, then the writes queued, then (with
        files to seal) waiting for them and sealing. Records errors in `save`, never raises."""
        try:
            for dst, src in copies:
                dst.copy_(src)
            if save.gpu_copies is not None:
                save.gpu_copies.synchronize()
        except BaseException as e:
            save.error = save.error or _detached(e, save.root)
            return
        finally:
            save.copies_done.set()
        for staged, path, key in files:
            save.futures.append(self._writer.submit(self._write, staged, path, key, save))
        if save.sealing is None:
            return
        for future in save.futures:
            future.result()
        try:
            for path in save.sealing:
                key = str(path.relative_to(save.root))
                st = os.stat(path)
                hasher = xxh3_128()
                with open(path, "rb") as f:
                    hasher.update(f.read())
                    os.fsync(f.fileno())
                save.records[key] = FileRecord(st.st_size, hasher.hexdigest())
                save.sealed[key] = (st.st_size, st.st_mtime_ns)
            for directory, _, _ in os.walk(save.root):
                fsync_dir(Path(directory))
        except OSError as e:
            save.error = save.error or _detached(e, path)

    def _write(self, staged: Any, path: Path, key: str, save: _Save) -> None:
        if save.error is not None:
            return  # an earlier file of this save failed: the save is lost anyway
        try:
            record = self._save_hashed(staged, path)
        except BaseException as e:
            save.error = save.error or _detached(e, path)
            return
        save.records[key] = record

    def _save_hashed(self, staged: Any, path: Path) -> FileRecord:
        """torch.save `staged` to `path` through a _HashingFile, then fsync: the commit (a rename)
        must never name data that is still only in the page cache."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            out = _HashingFile(fd)
            start = time.perf_counter()
            self._crc32(off=True)
            try:
                torch.save(staged, out)
                out.flush()
            except Exception:
                if out.error is None:
                    raise
                raise out.error from None  # torch reports it (ENOSPC, say) as 'unexpected pos'
            finally:
                self._crc32(off=False)
            written = time.perf_counter()
            os.fsync(fd)
            fsync_dir(path.parent)  # its entry too: the commit fsyncs only the directories it changes
            synced = time.perf_counter()
        finally:
            os.close(fd)  # also on errors: a deleted partial file (disk full) gives its space back
        return FileRecord(out.size, out.hexdigest(), written - start, synced - written)

    def _crc32(self, off: bool) -> None:
        # The zip records' crc32 costs about half of torch.save's time and duplicates the hash each
        # file gets in the MANIFEST (torch.load does not need it). The switch is process-wide: off
        # while any of our writes runs, restored after the last one.
        with self._crc_lock:
            if off:
                if self._writing == 0:
                    self._crc_before = torch.serialization.get_crc32_options()
                    torch.serialization.set_crc32_options(False)
                self._writing += 1
            else:
                self._writing -= 1
                if self._writing == 0:
                    torch.serialization.set_crc32_options(self._crc_before)


def _detached(error: BaseException, path: Path) -> BaseException:
    """A new exception with `error`'s message and the free space at `path`. Never the original: its
    traceback holds the frames of torch.save and the staged tensors (up to the whole state) for as long
    as the error is kept. A full disk reads as ENOSPC from our os.write, wrapped by torch."""
    try:
        free = f"; {shutil.disk_usage(path.parent).free / 1e6:.0f} MB free in {path.parent}"
    except OSError:
        free = ""
    return OSError(f"writing {path.name} failed: {type(error).__name__}: {error}{free}")


def _stage(
    obj: Any,
    buffers: list[torch.Tensor],
    counter: Any,
    deferred: frozenset[int],
    copies: list[tuple[torch.Tensor, torch.Tensor]],
) -> Any:
    """A copy of `obj` whose tensors live in `buffers` (reused when shape and dtype match: the state
    dicts of one run have the same structure at every save). Host tensors in `deferred` storages are
    not copied yet: their (buffer, tensor) pairs are appended to `copies`."""
    if isinstance(obj, torch.Tensor):
        index = next(counter)
        t = obj.detach()
        if index >= len(buffers) or buffers[index].shape != t.shape or buffers[index].dtype != t.dtype:
            fresh = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            if index < len(buffers):
                buffers[index] = fresh
            else:
                buffers.append(fresh)
        if not t.is_cuda and t.untyped_storage().data_ptr() in deferred:
            copies.append((buffers[index], t))
            return buffers[index]
        return buffers[index].copy_(t, non_blocking=t.is_cuda)
    if isinstance(obj, dict):
        return type(obj)((k, _stage(v, buffers, counter, deferred, copies)) for k, v in obj.items())
    if isinstance(obj, list | tuple) and not hasattr(obj, "_fields"):
        return type(obj)(_stage(v, buffers, counter, deferred, copies) for v in obj)
    if isinstance(obj, _IMMUTABLE):
        return obj
    try:  # e.g. a loss scaler object: it changes in place at later steps
        return copy.deepcopy(obj)
    except Exception:
        return obj


class _HashingFile:
    """The file object torch.save writes into. Each piece is hashed as it arrives, then written, so the
    hash needs no second read of the file. Large pieces (tensor data: memoryviews of the staging
    buffers) go to the fd with os.write, no copy in Python; the many small ones (zip headers, the
    pickle) are gathered first so they cost a few syscalls, not one each."""

    def __init__(self, fd: int, gather_bytes: int = 1 << 20) -> None:
        self._fd = fd
        self._hasher = xxh3_128()
        self._small = bytearray()
        self._gather_bytes = gather_bytes
        self.size = 0
        self.error: OSError | None = None  # the first failed os.write, in the OS's words

    def write(self, data: Any) -> int:
        with memoryview(data) as view, view.cast("B") as piece:
            self._hasher.update(piece)  # in write order, the order of the file's bytes
            self.size += piece.nbytes
            if piece.nbytes < self._gather_bytes:
                self._small += piece
                if len(self._small) >= self._gather_bytes:
                    self.flush()
            else:
                self.flush()  # what was gathered comes first in the file
                self._write_all(piece)
            return piece.nbytes

    def flush(self) -> None:
        if self._small:
            self._write_all(self._small)
            self._small.clear()

    def _write_all(self, data: Any) -> None:
        """os.write until all of `data` is written (a write may take less: signals, sizes over 2 GiB)."""
        try:
            with memoryview(data) as view:
                done = 0
                while done < view.nbytes:
                    done += os.write(self._fd, view[done:])
        except OSError as e:
            self.error = self.error or e
            raise

    def hexdigest(self) -> str:
        assert not self._small, "flush() first: the digest covers bytes not yet written"
        return self._hasher.hexdigest()
