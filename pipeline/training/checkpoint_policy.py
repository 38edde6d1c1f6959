"""The checkpoint policy of a run: when a save starts, when it commits, what happens when one fails.

A save starts at a due step (the loop waits only while tensors are staged in memory) and commits
(MANIFEST + rename) once every rank's background writes are done, which the loop learns from the
per-step agreement (`writes_busy`), or at the latest `checkpoint.max_commit_lag_steps` steps later, or
at once with `wait` (the last step, a preemption). `checkpoint.async_save=false` commits every save
before training goes on. Everything here is collective unless it says so.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline import tasks
from pipeline.checkpoint import commit, store
from pipeline.checkpoint.writer import BackgroundWriter
from pipeline.config import Config
from pipeline.data import cursor as data_cursor
from pipeline.data.shards import DataSpec
from pipeline.training import collectives
from pipeline.training.experience import EnvironmentSource
from pipeline.training.faults import Faults
from pipeline.training.meter import DataCounters
from pipeline.training.resume import rng_state
from pipeline.training.state import TrainState


class CheckpointPolicy:
    """The saves of one worker: `save(step, ...)` at due steps, `commit_if_ready(step, ...)` every step."""

    def __init__(
        self,
        *,
        cfg: Config,
        spec: DataSpec,
        num_outputs: int,
        engines: Mapping[str, Any],
        state: TrainState,
        batches: Any,
        counters: DataCounters,
        tracker: Any,
        faults: Faults,
        is_rank0: bool,
        world_size: int,
    ) -> None:
        self.cfg = cfg
        self.engines, self.state, self.batches, self.counters = engines, state, batches, counters
        self.tracker, self.faults = tracker, faults
        self.is_rank0 = is_rank0
        self.world_size = world_size
        # The same for every save of the run: computed once.
        self.model_metadata = model_metadata(cfg, spec, num_outputs)
        self.training_config = store.training_config(cfg.to_dict())
        self.writer = BackgroundWriter()
        self.store = store.for_config(cfg)
        # keep_best ranks by the task's own best metric unless checkpoint.best_metric names another
        metric, mode = tasks.best_of(
            tasks.task_class(cfg.task.name), cfg.checkpoint.best_metric, cfg.checkpoint.best_mode
        )
        self.retention = commit.Retention(cfg.checkpoint.keep_last, cfg.checkpoint.keep_best, metric, mode)
        self.pending: commit.PendingSave | None = None
        self.pending_weights: tuple[float, float] | None = None
        self.failures_in_a_row = 0
        self.last_commit: Path | None = None
        self.uploaded: dict[Path, str] = {}  # local commit -> its remote URL (checkpoint.dir s3://...)

    def busy(self) -> bool:
        """Not collective: whether this rank still writes a pending save (for the agreement)."""
        return self.pending is not None and not self.writer.done()

    def commit_if_ready(self, step: int, *, writes_busy: bool) -> None:
        """Commit a background save once every rank's writes are done (`writes_busy` as agreed), or at
        the latest checkpoint.max_commit_lag_steps steps after it (waiting for them): both conditions
        are agreed (flags, step), so every rank reaches this collective together."""
        pending = self.pending
        if pending is not None and (
            not writes_busy or step - pending.step >= self.cfg.checkpoint.max_commit_lag_steps
        ):
            self.finish(must_commit=False)

    def save(self, step: int, *, metrics: dict[str, Any], wait: bool) -> None:
        """Start a checkpoint of everything a resume needs after `step` (every engine, one commit);
        with `wait` (or synchronous saves), also commit it. Raises SaveFailed after
        `checkpoint.max_save_failures` failures in a row, or when `wait` (a preemption's save) fails."""
        cfg, state, engines = self.cfg, self.state, self.engines
        assert state.step == step
        self.counters.sync(state, self.tracker.event)  # the sample counts are part of the state
        if self.pending is not None:
            self.finish(must_commit=False)  # its writes had a whole checkpoint interval to finish
        gathered = collectives.gather_objects(self.batches.local_state())
        if isinstance(self.batches, EnvironmentSource):  # every rank's environments, in rank order
            state.env_states = gathered
        else:
            state.data_cursor = data_cursor.merge_rank_states(gathered).to_dict()
        state.rng = collectives.gather_objects(rng_state())
        for engine in engines.values():
            collectives.average_buffers(engine.module)  # the saved statistics are every rank's
        if not collectives.all_true(all(engine.is_finite() for engine in engines.values())):
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
                all_ok=collectives.all_true,
                writer=self.writer,
                metadata={
                    **self.model_metadata,
                    "world_size": self.world_size,
                    "config_digest": state.config_digest,
                    "training_config": self.training_config,  # compared on resume (launch/plan.py)
                    "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
                },
                before_commit=functools.partial(self.faults.in_save, step),
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
                all_ok=collectives.all_true,
                gather=collectives.gather_objects,
                writer=self.writer,
                # with a remote mirror, local retention runs after the upload (store.publish)
                retention=None if self.store.remote else self.retention,
                crash_point=functools.partial(self.faults.in_commit, pending.step),
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


def weights_checksum(engines: Mapping[str, Any]) -> tuple[float, float]:
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
            "action_space": spec.action_space,  # an environment task's (None otherwise)
        },
        "env": cfg.env.model_dump() if spec.action_space else None,
        # a token model's vocabulary (classes are its symbols): `pipeline generate` needs no shards
        "data": {"mean": spec.mean, "std": spec.std, "classes": spec.classes, "vocab": spec.vocab},
        "task": {"name": cfg.task.name, "args": cfg.task.args},
        "precision": cfg.precision,
        "zero_stage": cfg.zero.stage,
    }
