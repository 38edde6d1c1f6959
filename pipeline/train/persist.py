"""What the loop saves and restores besides the engines: the resume point, RNG states, the commit call.

Kept out of loop.py so the loop reads top to bottom; everything here is collective unless it says so.
"""

from __future__ import annotations

import base64
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpoint import commit, store, universal
from pipeline.checkpoint.writer import BackgroundWriter
from pipeline.config import Config
from pipeline.data import cursor as data_cursor
from pipeline.data.shards import DataSpec
from pipeline.train import distributed as dist


def agree_resume_point(cfg: Config, given: str | None, is_rank0: bool) -> str | None:
    """The checkpoint every rank resumes from. The launcher's choice (`given`, checked before launch)
    unless this run dir has a newer commit: after Ray restarts the worker group, the newest verified
    commit is the right one. Rank 0 decides (verification reads files), everyone follows."""
    choice = given
    if is_rank0:
        newest = store.for_config(cfg).newest_verified(warn=lambda m: print(f"warning: {m}", flush=True))
        if newest is not None and (given is None or _step_of(newest) > _step_of(Path(given))):
            choice = str(newest)
    return dist.broadcast_object(choice)


def _step_of(ckpt: Path) -> int:
    return int(commit.read_manifest(ckpt)["step"])


def prepare_engine_load(
    resume_from: str | None, world_size: int, engine: str, is_rank0: bool
) -> tuple[Path, str, bool]:
    """Where the engine loads from: the checkpoint itself, or (another world size under ZeRO 1-3) its
    universal conversion, made once by rank 0 and cached. Returns (load dir, tag, universal?)."""
    assert resume_from is not None
    ckpt = Path(resume_from)
    manifest = commit.read_manifest(ckpt)
    if manifest["world_size"] == world_size or manifest["zero_stage"] == 0:
        return ckpt / "engines" / engine, commit.ENGINE_TAG, False
    error = None
    if is_rank0:
        try:
            universal.convert(ckpt, engine)
        except commit.CheckpointError as e:
            error = str(e)
    error = dist.broadcast_object(error)  # also: nobody loads before the conversion is complete
    if error:
        raise commit.CheckpointError(error)
    return universal.universal_dir(ckpt, engine), universal.UNIVERSAL_TAG, True


class Checkpointer:
    """The saves of one worker. A save starts at a due step (the loop waits only while tensors are
    staged in memory) and is finished (MANIFEST + rename) once every rank's background writes are done,
    which the loop learns from the per-step flags all-reduce (`busy`), or at once with `wait`.
    `checkpoint.async_save=false` finishes every save before training goes on."""

    def __init__(
        self, cfg: Config, spec: DataSpec, task: Any, is_rank0: bool, world_size: int, tracker: Any
    ) -> None:
        self.cfg = cfg
        self.is_rank0 = is_rank0
        self.world_size = world_size
        self.tracker = tracker
        # The same for every save of the run: computed once.
        self.model_metadata = model_metadata(cfg, spec, task.num_outputs(spec.num_classes))
        self.writer = BackgroundWriter()
        self.store = store.for_config(cfg)
        self.retention = commit.Retention(
            cfg.checkpoint.keep_last,
            cfg.checkpoint.keep_best,
            cfg.checkpoint.best_metric,
            cfg.checkpoint.best_mode,
        )
        self.pending: commit.PendingSave | None = None
        self.pending_weights: tuple[float, float] | None = None
        self.failures_in_a_row = 0
        self.last_commit: Path | None = None
        self.uploaded: dict[Path, str] = {}  # local commit -> its remote URL (checkpoint.dir s3://...)

    def busy(self) -> float:
        """1.0 while this rank still writes a pending save (for the step flags all-reduce)."""
        return float(self.pending is not None and not self.writer.done())

    def save(
        self,
        engines: dict[str, Any],
        state: Any,
        batches: Any,
        metrics: dict[str, Any],
        before_commit: Any,
        wait: bool,
    ) -> None:
        """Collective. Start a checkpoint of everything a resume needs (every engine, one commit); with
        `wait` (or synchronous saves), also finish it. Raises SaveFailed after
        `checkpoint.max_save_failures` failures in a row, or when `wait` (a preemption's save) fails."""
        if self.pending is not None:
            self.finish(must_commit=False)  # its writes had a whole checkpoint interval to finish
        cfg = self.cfg
        state.data_cursor = data_cursor.merge_rank_states(
            dist.gather_objects(batches.local_state())
        ).to_dict()
        state.rng = dist.gather_objects(rng_state())
        for engine in engines.values():
            dist.average_buffers(engine.module)  # the saved statistics are every rank's
        if not dist.all_true(all(engine.is_finite() for engine in engines.values())):
            self.tracker.event("checkpoint_refused", step=state.step, reason="non-finite weights")
            self._failed(state.step, "non-finite weights", must_commit=wait)
            return
        weights = weights_checksum(engines)  # collective; taken now, training changes the weights
        try:
            self.pending = commit.start(
                list(engines.values()),
                state.to_dict(),
                cfg.checkpoint_dir,
                state.step,
                is_rank0=self.is_rank0,
                all_ok=dist.all_true,
                writer=self.writer,
                metadata={
                    **self.model_metadata,
                    "world_size": self.world_size,
                    "config_digest": state.config_digest,
                    "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
                },
                before_commit=before_commit,
            )
        except commit.SaveFailed as e:
            self._failed(state.step, str(e), must_commit=wait)
            return
        self.pending_weights = weights
        if wait or not cfg.checkpoint.async_save:
            self.finish(must_commit=wait)

    def finish(self, must_commit: bool = True) -> None:
        """Collective. Commit the pending save (waiting for this rank's writes)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        try:
            path = commit.finish(
                pending,
                is_rank0=self.is_rank0,
                all_ok=dist.all_true,
                gather=dist.gather_objects,
                writer=self.writer,
                # with a remote mirror, local retention runs after the upload (store.publish)
                retention=None if self.store.remote else self.retention,
            )
        except commit.SaveFailed as e:
            self._failed(pending.step, str(e), must_commit)
            return
        self.failures_in_a_row = 0
        self.last_commit = path
        self.tracker.event(
            "checkpoint_commit", step=pending.step, path=str(path), weights=self.pending_weights
        )
        if self.is_rank0:
            self._report_uploads(wait=False)
            self.store.publish(path, self.retention)

    def close(self) -> None:
        """Collective: commit what is pending, wait for uploads, stop the writer threads."""
        self.finish()
        if self.is_rank0:
            self._report_uploads(wait=True)
        self.writer.close()

    def _report_uploads(self, wait: bool) -> None:
        # An upload failure leaves the local commit (resumable on this filesystem): warn, go on.
        for ckpt, url, error in self.store.finished_uploads(wait):
            if error:
                print(f"warning: checkpoint {ckpt.name} not uploaded: {error}", flush=True)
                self.tracker.event("checkpoint_upload_failed", path=str(ckpt), error=error)
            else:
                self.tracker.event("checkpoint_upload", path=str(ckpt), url=url)
                self.uploaded[ckpt] = url

    def last_uri(self) -> str | None:
        """The run's newest commit: its remote URL once uploaded, else its local path (rank 0)."""
        newest = self.last_commit or next(reversed(commit.committed(self.cfg.checkpoint_dir)), None)
        return None if newest is None else self.uploaded.get(newest, str(newest))

    def _failed(self, step: int, error: str, must_commit: bool) -> None:
        print(f"warning: checkpoint of step {step} not saved, training goes on: {error}", flush=True)
        self.tracker.event("checkpoint_failed", step=step, error=error)
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= self.cfg.checkpoint.max_save_failures or must_commit:
            raise commit.SaveFailed(
                f"{self.failures_in_a_row} checkpoint save(s) in a row failed "
                f"(checkpoint.max_save_failures={self.cfg.checkpoint.max_save_failures}); last: {error}"
            )


def weights_checksum(engines: dict[str, Any]) -> tuple[float, float]:
    """Collective: (sum, sum of squares) of every engine's fp32 master weights, added up."""
    checksums = [engine.weights_checksum() for engine in engines.values()]
    return sum(c[0] for c in checksums), sum(c[1] for c in checksums)


def model_metadata(cfg: Config, spec: DataSpec, num_outputs: int) -> dict[str, Any]:
    """What `pipeline eval`/`export` need to rebuild the model from a checkpoint alone."""
    return {
        "model": {
            "name": cfg.model.name,
            "args": cfg.model.args,
            "input_shape": spec.sample_shape,
            "num_classes": num_outputs,  # what the model was built with (0: no labels, e.g. a GAN)
        },
        "data": {"mean": spec.mean, "std": spec.std, "classes": spec.classes},
        "task": {"name": cfg.task.name, "args": cfg.task.args},
        "precision": cfg.precision,
        "zero_stage": cfg.zero.stage,
    }


def rng_state() -> dict[str, Any]:
    """This rank's RNG states (torch CPU/CUDA, Python, NumPy), JSON-able."""
    state: dict[str, Any] = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(
        torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy())
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(
            torch.from_numpy(np.frombuffer(base64.b64decode(state["cuda"]), dtype=np.uint8).copy())
        )
    random.setstate(_tupled(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value
