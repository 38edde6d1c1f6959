"""The one training loop, run by every worker: build, for step ..., log/eval/commit/save when due.

Collectives every rank must reach in the same order: building (see build.py); per micro-batch, the
agreement (one all-reduce per `Step.update`, or one per micro-batch when the task updates nothing);
at log steps, the counter sync, the loss all-reduce and the peak-memory all-reduce; at eval steps,
the evaluation (every forward under ZeRO-3 gathers parameters); a commit of a background save when
every rank's writes are done; saves; and at the end, the close (a last commit). Whether each is due
depends only on `step` and on agreed flags, which all ranks share, so no rank can skip one.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pipeline.checkpoint import commit
from pipeline.config import Config
from pipeline.data.shards import DataSpec
from pipeline.data.transforms import normalize
from pipeline.engine import compile_seconds
from pipeline.tasks.base import Step
from pipeline.training import telemetry
from pipeline.training.agreement import Flags
from pipeline.training.build import RunContext, WorkerEnv, build_run
from pipeline.training.checkpoint_policy import weights_checksum
from pipeline.training.experience import EnvironmentSource, episode_window
from pipeline.training.meter import TooManyBadSamples

__all__ = ["NonFiniteLoss", "TooManyBadSamples", "WorkerEnv", "due", "run", "train_step"]


class NonFiniteLoss(RuntimeError):
    """train.max_nonfinite_steps steps in a row had a NaN/Inf loss (exit 1)."""


def due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def run(cfg: Config, spec: DataSpec, env: WorkerEnv, resume_from: str | None = None) -> dict[str, Any]:
    """Train to `train.max_steps`, continuing from the newest verified checkpoint. Returns the final
    metrics (the same on every rank); `preempted` is set when a stop was requested."""
    with build_run(cfg, spec, env, resume_from) as ctx:
        train, every_save = ctx.cfg.train, ctx.cfg.checkpoint.every
        flags = ctx.agreement.flags
        for step in range(ctx.state.step + 1, train.max_steps + 1):
            last = step == train.max_steps
            flags = train_step(ctx, step, measure_grad_norm=due(step, train.log_every) or last)
            if due(step, train.log_every) or last:
                log_window(ctx, step)
            if due(step, train.eval_every) or (last and not flags.stop):
                evaluate(ctx, step)
            ctx.checkpoints.commit_if_ready(step, writes_busy=flags.writes_busy)
            if due(step, every_save) or last or flags.stop:
                ctx.checkpoints.save(step, metrics=ctx.final, wait=last or flags.stop)
                if ctx.checkpoints.last_commit is not None:
                    ctx.final["checkpoint"] = str(ctx.checkpoints.last_commit)
                ctx.meter.restart_clock()  # save time is not training throughput
            if flags.stop:
                ctx.tracker.event("preempted", step=step, signal=ctx.stop.signalled)
                break
        return finish(ctx, preempted=flags.stop)


def train_step(ctx: RunContext, step: int, *, measure_grad_norm: bool) -> Flags:
    """One optimizer step: `train.grad_accum` micro-batches through the task. A non-finite loss in
    any micro-batch skips the whole step on every rank: no update, no gradient kept, DeepSpeed's
    accumulation counter back where the step began. The remaining micro-batches are still read and
    run forward (the data and RNG streams match a run whose whole step was non-finite)."""
    ctx.faults.at_step_start(step)
    for engine in ctx.engines.values():
        engine.measure_grad_norm(measure_grad_norm)  # ZeRO-1/2 without clipping: its all-reduces only now
    step_keys: list[str] = []
    step_losses: list[dict[str, Any]] = []
    skipped = False
    for micro in range(ctx.cfg.train.grad_accum):
        io = next_input(ctx, step, micro, skipped, step_keys)
        losses = ctx.task.train_step(io)
        if io.updates == 0:  # the stop and writes flags are agreed once per micro-batch regardless
            ctx.agreement.refresh()
        if io.skipped and not skipped:
            skipped = True
            for engine in ctx.engines.values():
                engine.abandon_accumulation()  # earlier micro-batches' gradients of this step
        step_losses.append(losses)
    ctx.state.step = step
    if isinstance(ctx.batches, EnvironmentSource):  # samples are environment steps (counted, not planned)
        taken = ctx.batches.take_steps()
        ctx.counters.good += taken
        ctx.meter.samples_per_micro_batch = taken * ctx.env.world_size
    if skipped:
        note_nonfinite(ctx, step)
    else:
        ctx.nonfinite_in_a_row = 0
        for losses in step_losses:
            ctx.meter.add(losses)
    ctx.meter.step_done()
    if ctx.ledger is not None and step_keys:
        ctx.ledger.write({"step": step, "keys": step_keys})
    if "first_step" not in ctx.startup_marks:
        note_first_step(ctx, step)
    return ctx.agreement.flags


def next_input(ctx: RunContext, step: int, micro: int, skipped: bool, step_keys: list[str]) -> Step:
    """The task's view of one micro-batch: the next batch of shards, normalised on the device, or an
    environment task's environments (it collects its own rollout; grad_accum is 1, plan.py)."""
    if isinstance(ctx.batches, EnvironmentSource):
        ctx.agreement.at(step, micro)
        empty = torch.empty(0, device=ctx.env.device)
        return Step(
            x=empty,
            y=empty,
            number=step,
            engines=ctx.engines,
            agree=ctx.agreement,
            skipped=skipped,
            envs=ctx.batches.envs,
        )
    batch = ctx.next_batch()
    step_keys += batch.keys
    ctx.agreement.at(step, micro)
    x = normalize(batch.x.to(ctx.env.device, non_blocking=True), ctx.spec.mean, ctx.spec.std)
    y = batch.y.to(ctx.env.device, non_blocking=True)
    return Step(x=x, y=y, number=step, engines=ctx.engines, agree=ctx.agreement, skipped=skipped)


def note_first_step(ctx: RunContext, step: int) -> None:
    """The startup event: where the time from `pipeline train` to the first step done went."""
    ctx.startup_marks |= {"first_step": time.time(), "first_batch_wait": ctx.batches.wait_s}
    if ctx.cfg.train.compile_options:  # torch.compile ran inside the first step (its forward, backward)
        ctx.startup_marks["compile"] = compile_seconds() - ctx.startup_marks["compile_before"]
    ctx.tracker.event("startup", **telemetry.startup_phases(ctx.startup_marks))
    if ctx.resume_from:  # recovery time: restart/resume event -> here
        ctx.tracker.event("first_step_after_resume", step=step)


def note_nonfinite(ctx: RunContext, step: int) -> None:
    """A skipped step: counted, reported, and fatal after train.max_nonfinite_steps in a row."""
    ctx.nonfinite_in_a_row += 1
    ctx.state.nonfinite_steps += 1
    weights = weights_checksum(ctx.engines)  # collective
    ctx.tracker.event("nonfinite", step=step, in_a_row=ctx.nonfinite_in_a_row, weights=weights)
    limit = ctx.cfg.train.max_nonfinite_steps
    if ctx.nonfinite_in_a_row >= limit:
        raise NonFiniteLoss(
            f"{ctx.nonfinite_in_a_row} steps in a row with a non-finite loss (step {step}); "
            f"train.max_nonfinite_steps={limit}"
        )


def log_window(ctx: RunContext, step: int) -> None:
    """Collective (host syncs once per log interval): the window's train/ metrics to the tracker."""
    ctx.counters.sync(ctx.state, ctx.tracker.event)
    metrics = ctx.meter.window_metrics()  # the mean losses, samples/s, input stall
    if isinstance(ctx.batches, EnvironmentSource):  # the episodes finished in the window
        metrics |= episode_window(ctx.batches)
        metrics["train/env_steps"] = ctx.state.samples_seen
    # the first engine's LR and grad norm are train/lr and train/grad_norm
    metrics |= telemetry.optimizer_metrics(ctx.engines, ctx.task.ENGINES[0])
    metrics |= {
        "train/samples_seen": ctx.state.samples_seen,
        "train/epoch": ctx.batches.epoch,
        "train/samples_skipped": ctx.state.samples_skipped,
        "train/nonfinite_steps": ctx.state.nonfinite_steps,
        **telemetry.peak_memory_mb(ctx.env.device),  # collective
    }
    ctx.tracker.log(step, metrics)
    ctx.final.update(metrics)


def evaluate(ctx: RunContext, step: int) -> None:
    """Collective: the evaluator's metrics of this step, logged."""
    metrics = ctx.evaluator.evaluate(step, ctx.state)
    ctx.tracker.log(step, metrics)
    ctx.final.update(metrics)
    ctx.meter.restart_clock()  # eval time is not training throughput


def finish(ctx: RunContext, *, preempted: bool) -> dict[str, Any]:
    """Collective: commit what is pending, evaluate a run resumed after its last step, and return
    the final metrics; rank 0 closes the tracker with the run summary."""
    ctx.checkpoints.close()
    if not any(k.startswith("eval/") for k in ctx.final) and not preempted:  # resumed a finished run
        ctx.final.update(ctx.evaluator.evaluate(ctx.state.step, ctx.state))
    best_metric = ctx.task.best_metric
    ctx.final |= {
        "step": ctx.state.step,
        "run_id": ctx.state.run_id,
        f"best/{best_metric}": ctx.state.best.get(best_metric),
        "samples_skipped": ctx.state.samples_skipped,
        "preempted": preempted,
    }
    ctx.tracker.event(
        "finish", step=ctx.state.step, samples_skipped=ctx.state.samples_skipped, preempted=preempted
    )
    if ctx.env.is_rank0:  # the W&B run summary: final and best metrics, where the checkpoints are
        # the checkpoint checkpoint.keep_best ranks first (checkpoint.best_metric, else the task's)
        ranking = ctx.checkpoints.retention
        best_ckpt = commit.best(ctx.cfg.checkpoint_dir, ranking.metric, ranking.mode)
        last_ckpt = ctx.checkpoints.last_uri()
        summary = {"checkpoint/last": last_ckpt, "checkpoint/best": best_ckpt and str(best_ckpt)}
        ctx.tracker.close(summary=ctx.final | summary, checkpoint=last_ckpt)
    return ctx.final
