"""The one training loop, run by every worker: build, resume, for step ..., log/eval/save when due.

Collectives every rank must reach in the same order: engine creation and loading, the counter
all-reduce at log steps, evaluation (every forward under ZeRO-3 gathers parameters), and checkpoint
saves. Whether they are due depends only on `step`, which all ranks share, so no rank can skip one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline import tasks
from pipeline.checkpoint import commit, store
from pipeline.config import Config
from pipeline.data import cursor as data_cursor
from pipeline.data.shards import DataSpec
from pipeline.data.stream import Batch, TrainBatches
from pipeline.data.transforms import normalize
from pipeline.tasks import gan
from pipeline.tracking import JsonlWriter, make_tracker
from pipeline.train import distributed as dist
from pipeline.train import evaluation, persist, telemetry
from pipeline.train.engines import build_engines
from pipeline.train.faults import Faults
from pipeline.train.persist import weights_checksum
from pipeline.train.signals import StopRequest
from pipeline.train.state import TrainState


class TooManyBadSamples(RuntimeError):
    """data.on_error=skip, and more than data.max_skip_fraction of the data was bad (exit 1)."""


class NonFiniteLoss(RuntimeError):
    """train.max_nonfinite_steps steps in a row had a NaN/Inf loss (exit 1)."""


@dataclass
class WorkerEnv:
    """Who this worker is; filled by the launcher (Ray, or the local process launcher)."""

    rank: int
    world_size: int
    local_rank: int = 0
    device: str = "cpu"
    run_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


class Agreement:
    """The collective every rank calls once per backward (tasks call it; see tasks/__init__.py). One
    tiny all-reduce, the step's only host sync: every rank must agree to skip a non-finite loss (a
    rank that steps alone would deadlock ZeRO's collectives), to stop for a preemption at the same
    step, and on when all background checkpoint writes are done (then the commit, itself collective,
    cannot block). `flags` holds the last agreed (non-finite, stop, writes busy)."""

    def __init__(self, faults: Faults, stop: StopRequest, checkpointer: persist.Checkpointer) -> None:
        self.faults, self.stop, self.checkpointer = faults, stop, checkpointer
        self.step = 0
        self.flags = [0.0, 0.0, 0.0]

    def _local(self, loss: torch.Tensor) -> torch.Tensor:
        bad = (~torch.isfinite(loss.detach())).any().float()
        if self.faults.nan_loss(self.step):
            bad = torch.ones_like(bad)
        return torch.stack(
            [bad, bad.new_tensor(self.stop.requested()), bad.new_tensor(self.checkpointer.busy())]
        )

    def __call__(self, loss: torch.Tensor) -> bool:
        return self.start(loss)()

    def start(self, loss: torch.Tensor) -> Callable[[], bool]:
        wait = dist.all_reduce_async(self._local(loss), "max")

        def agreed() -> bool:
            self.flags = wait().tolist()
            return not self.flags[0]

        return agreed


def due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


@dataclass
class DataCounters:
    """Good and bad samples since the last sync; synced (collectively) at log steps and saves."""

    good: int = 0
    bad: list = field(default_factory=list)

    def sync(self, state: TrainState, tracker: Any, cfg: Config, spec: DataSpec, device: str) -> None:
        gathered = dist.gather_objects([(b.shard, b.key, b.reason) for b in self.bad])
        for shard, key, reason in (b for rank_bad in gathered for b in rank_bad):
            tracker.event("skip_sample", step=state.step, shard=shard, key=key, reason=reason)
        good = dist.all_reduce(torch.tensor([float(self.good)], device=device)).item()
        state.samples_seen += int(good)
        state.samples_skipped += sum(len(r) for r in gathered)
        self.good, self.bad = 0, []
        # Every rank sees the same totals, so all ranks stop together (no rank left in a collective).
        budget = cfg.data.max_skip_fraction * max(
            state.samples_seen + state.samples_skipped, spec.train_samples
        )
        if state.samples_skipped > budget:
            raise TooManyBadSamples(
                f"{state.samples_skipped} bad samples skipped, more than data.max_skip_fraction="
                f"{cfg.data.max_skip_fraction} allows ({budget:.0f}); see skip_sample events in events.jsonl"
            )


def next_good_batch(batches: TrainBatches, counters: DataCounters) -> Batch:
    """The next batch with at least one good sample (skip mode can drop a whole batch)."""
    while True:
        batch = next(batches)
        counters.bad += batch.bad
        if batch.keys:
            counters.good += len(batch.keys)
            return batch


def evaluate_all(
    engines: dict[str, Any],
    task: Any,
    spec: DataSpec,
    cfg: Config,
    env: WorkerEnv,
    step: int,
    fixed_x: torch.Tensor | None,
    classifier: evaluation.Classifier | None,
    tracker: Any,
) -> dict[str, float]:
    """Collective: the task's val metrics; for generative tasks also the image grid (rank 0 writes
    samples/step_X.png) and, for a GAN with `task.score_classifier`, eval/digit_score."""
    metrics = evaluation.evaluate(engines, task, spec, cfg, env.device)
    if fixed_x is not None:
        for engine in engines.values():
            engine.train(False)
        images = task.grid(engines, fixed_x)
        for engine in engines.values():
            engine.train(True)
        if images is not None and env.is_rank0:
            grid = evaluation.write_grid(
                images, spec, cfg.resolved_run_dir / "samples" / f"step_{step:08d}.png"
            )
            tracker.image(step, "samples/grid", grid)
    if classifier is not None and "generator" in engines:
        metrics["eval/digit_score"] = evaluation.digit_score(
            engines["generator"],
            gan.latent_dim_of(engines["generator"]),
            classifier,
            spec,
            cfg.task.score_samples,
            env.device,
            cfg.seed,
        )
    return metrics


def _attempt(run_dir: Path, launch_id: str, is_rank0: bool) -> int:
    """How many times this launch's workers have started before (Ray restarts them after a failure)."""
    attempt = 0
    if is_rank0 and launch_id:
        marker = run_dir / ".launches" / launch_id
        attempt = int(marker.read_text()) + 1 if marker.exists() else 0
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(attempt))
    return dist.broadcast_object(attempt)


def run(cfg: Config, spec: DataSpec, env: WorkerEnv, resume_from: str | None = None) -> dict[str, Any]:
    """Train to `train.max_steps`, continuing from the newest verified checkpoint (see `agree_resume_point`).
    Returns the final metrics (the same on every rank); `preempted` is set when a stop was requested."""
    startup = {**env.extra.get("times", {}), "worker": time.time()}  # marks for the startup event
    torch.set_num_threads(cfg.train.torch_threads or cfg.cluster.cpus_per_worker)
    run_dir = cfg.resolved_run_dir
    state = TrainState(
        run_id=env.run_id or TrainState().run_id, config_digest=cfg.digest(), world_size=env.world_size
    )
    stop = StopRequest(run_dir)
    faults = Faults(run_dir, env.rank)
    attempt = _attempt(run_dir, env.extra.get("launch_id", ""), env.is_rank0)
    resume_from = persist.agree_resume_point(cfg, resume_from, env.is_rank0)
    if env.is_rank0:
        store.for_config(cfg).remove_debris()  # partial saves and uploads of a run that died mid-write

    task = tasks.build(cfg.task.name, cfg.task.args)
    mean, std = task.normalization(spec.mean, spec.std)
    spec = dataclasses.replace(spec, mean=mean, std=std)  # the space the models see (and grids undo)
    engines, universal = build_engines(cfg, spec, task, env.rank, env.world_size, resume_from)
    startup["engines"] = time.time()
    if resume_from:
        state = TrainState.from_dict(commit.read_state(Path(resume_from)))  # step, run id, cursor, RNG ...
        state.config_digest, state.world_size = cfg.digest(), env.world_size

    tracker = make_tracker(
        env.is_rank0, run_dir, cfg.train.max_steps, cfg.tracking.wandb, cfg.to_dict(), state.run_id, cfg.name
    )
    cursor = data_cursor.Cursor.from_dict(state.data_cursor) if state.data_cursor else None
    batches = TrainBatches(
        spec, cfg.data, env.rank, env.world_size, cfg.seed, cursor, pin_memory=env.device.startswith("cuda")
    )
    summary = telemetry.start_summary(
        cfg,
        spec,
        engines,
        batches,
        env.device,
        state.step,
        resume_from,
        tracker.location(),
        env.extra.get("node"),
    )
    tracker.event("start", run_id=state.run_id, **summary)
    if env.is_rank0:
        print(telemetry.format_start_summary(cfg.name, state.run_id, summary), flush=True)
    if attempt:
        tracker.event("restart", attempt=attempt)
    if resume_from:
        tracker.event(
            "resume",
            from_step=state.step,
            checkpoint=resume_from,
            universal=universal,
            weights=weights_checksum(engines),
        )
    # RNG last: starting DataLoader processes draws from the global torch RNG, so restoring before
    # that would shift every later dropout mask against the unbroken run.
    if resume_from and len(state.rng) == env.world_size:
        persist.restore_rng(state.rng[env.rank])
    elif resume_from:  # another world size: per-rank streams cannot carry over; reseed from the step
        torch.manual_seed(cfg.seed * 100_003 + env.rank + 7919 * state.step)
    ledger = JsonlWriter(run_dir / "ledger" / f"rank{env.rank}.jsonl") if cfg.data.ledger else None
    counters = DataCounters()
    final: dict[str, Any] = {}
    nonfinite_in_a_row = 0
    checkpointer = persist.Checkpointer(cfg, spec, task, env.is_rank0, env.world_size, tracker)
    resumed_at = state.step
    preempted = False

    agree = Agreement(faults, stop, checkpointer)

    fixed_x = evaluation.fixed_inputs(spec, cfg, env.device) if not task.needs_labels else None
    classifier = None  # for the GAN's eval/digit_score
    if cfg.task.score_classifier:
        classifier = evaluation.load_classifier(cfg.task.score_classifier, env.device)
    window: dict[str, torch.Tensor] = {}
    window_start, window_steps, window_wait_s = time.perf_counter(), 0, batches.wait_s
    for engine in engines.values():
        engine.train(True)
    startup["loop"] = time.time()
    for step in range(state.step + 1, cfg.train.max_steps + 1):
        faults.at_step_start(step)
        agree.step = step
        logging_now = due(step, cfg.train.log_every) or step == cfg.train.max_steps
        for engine in engines.values():
            engine.measure_grad_norm(logging_now)  # ZeRO-1/2 without clipping: its all-reduces only now
        step_keys: list[str] = []
        skipped = False
        for _ in range(cfg.train.grad_accum):
            batch = next_good_batch(batches, counters)
            step_keys += batch.keys
            x = normalize(batch.x.to(env.device, non_blocking=True), spec.mean, spec.std)
            y = batch.y.to(env.device, non_blocking=True)
            losses, micro_skipped = task.train_step(engines, x, y, step, agree)
            if micro_skipped:
                skipped = True
                if cfg.train.grad_accum == 1:
                    break  # no backward, no optimizer step: the weights stay as they were
                continue  # with accumulation, the bad micro-batch is dropped (the others are kept)
            for key, value in losses.items():
                window[key] = window.get(key, 0.0) + value.float()
        state.step = step
        window_steps += 1
        if skipped:
            nonfinite_in_a_row += 1
            state.nonfinite_steps += 1
            tracker.event(
                "nonfinite", step=step, in_a_row=nonfinite_in_a_row, weights=weights_checksum(engines)
            )
            if nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                raise NonFiniteLoss(
                    f"{nonfinite_in_a_row} steps in a row with a non-finite loss (step {step}); "
                    f"train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}"
                )
        else:
            nonfinite_in_a_row = 0
        if ledger is not None:
            ledger.write({"step": step, "keys": step_keys})
        if step == resumed_at + 1:
            startup |= {"first_step": time.time(), "first_batch_wait": batches.wait_s}
            tracker.event("startup", **telemetry.startup_phases(startup))
            if resume_from:  # recovery time: restart/resume event -> here
                tracker.event("first_step_after_resume", step=step)

        if logging_now:
            # Host syncs once per log interval: counters, the mean loss.
            counters.sync(state, tracker, cfg, spec, env.device)
            done_micro = max(1, window_steps * cfg.train.grad_accum)
            keys = sorted(window)  # the same on every rank: the tasks' decisions are agreed
            means = (
                (
                    dist.all_reduce(torch.stack([window[k] for k in keys]) / done_micro) / env.world_size
                ).tolist()
                if keys  # empty on every rank when every step of the window was skipped
                else []
            )
            elapsed_s = time.perf_counter() - window_start
            metrics = {
                **{f"train/{k}": v for k, v in zip(keys, means, strict=True)},
                # the first engine's LR and grad norm are train/lr and train/grad_norm
                **telemetry.optimizer_metrics(engines, task.ENGINES[0]),
                "train/samples_per_s": window_steps
                * cfg.data.batch_size
                * cfg.train.grad_accum
                * env.world_size
                / elapsed_s,
                "train/data_wait_frac": (batches.wait_s - window_wait_s) / elapsed_s,
                "train/samples_seen": state.samples_seen,
                "train/epoch": batches.epoch,
                "train/samples_skipped": state.samples_skipped,
                "train/nonfinite_steps": state.nonfinite_steps,
                **telemetry.peak_memory_mb(env.device),  # collective
            }
            tracker.log(step, metrics)
            final.update(metrics)
            window = {}
            window_start, window_steps, window_wait_s = time.perf_counter(), 0, batches.wait_s

        preempted = bool(agree.flags[1])
        if due(step, cfg.train.eval_every) or (step == cfg.train.max_steps and not preempted):
            eval_metrics = evaluate_all(engines, task, spec, cfg, env, step, fixed_x, classifier, tracker)
            tracker.log(step, eval_metrics)
            final.update(eval_metrics)
            best, value = state.best.get(task.best_metric), eval_metrics.get(task.best_metric)
            if value is not None and (
                best is None or (value > best if task.best_mode == "max" else value < best)
            ):
                state.best[task.best_metric] = value
            window_start = time.perf_counter()  # eval time is not training throughput

        # Commit a background save once every rank's writes are done, or at the latest
        # checkpoint.max_commit_lag_steps steps after it (waiting for them): both conditions are
        # agreed (flags, step), so every rank reaches this collective together.
        pending = checkpointer.pending
        if pending is not None and (
            not agree.flags[2] or step - pending.step >= cfg.checkpoint.max_commit_lag_steps
        ):
            checkpointer.finish(must_commit=False)
        if due(step, cfg.checkpoint.every) or step == cfg.train.max_steps or preempted:
            counters.sync(state, tracker, cfg, spec, env.device)
            last = step == cfg.train.max_steps or preempted  # committed before the process may exit
            checkpointer.save(engines, state, batches, final, lambda: faults.in_save(state.step), wait=last)
            if checkpointer.last_commit is not None:
                final["checkpoint"] = str(checkpointer.last_commit)
            window_start = time.perf_counter()
        if preempted:
            tracker.event("preempted", step=step, signal=stop.signalled)
            break

    checkpointer.close()
    if not any(k.startswith("eval/") for k in final) and not preempted:  # resumed a finished run
        final.update(evaluate_all(engines, task, spec, cfg, env, state.step, fixed_x, classifier, tracker))
    final |= {
        "step": state.step,
        "run_id": state.run_id,
        f"best/{task.best_metric}": state.best.get(task.best_metric),
        "samples_skipped": state.samples_skipped,
        "preempted": preempted,
    }
    tracker.event("finish", step=state.step, samples_skipped=state.samples_skipped, preempted=preempted)
    if env.is_rank0:  # the W&B run summary: final and best metrics, where the checkpoints are
        best_ckpt = commit.best(cfg.checkpoint_dir, task.best_metric, task.best_mode)
        last_ckpt = checkpointer.last_uri()
        tracker.close(
            summary=final | {"checkpoint/last": last_ckpt, "checkpoint/best": best_ckpt and str(best_ckpt)},
            checkpoint=last_ckpt,
        )
    else:
        tracker.close()
    if ledger is not None:
        ledger.close()
    batches.close()
    return final
