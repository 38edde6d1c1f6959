"""The one training loop, run by every worker: build, resume, for step ..., log/eval/save when due.

Collectives every rank must reach in the same order: engine creation and loading, the counter
all-reduce at log steps, evaluation (every forward under ZeRO-3 gathers parameters), and checkpoint
saves. Whether they are due depends only on `step`, which all ranks share, so no rank can skip one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline import models
from pipeline.checkpoint import commit, store
from pipeline.config import Config
from pipeline.data import cursor as data_cursor
from pipeline.data.shards import DataSpec
from pipeline.data.stream import Batch, TrainBatches, eval_batches
from pipeline.data.transforms import normalize
from pipeline.engine import Engine, build_engine
from pipeline.tasks import classify
from pipeline.tracking import JsonlWriter, make_tracker
from pipeline.train import distributed as dist
from pipeline.train import finetune, persist
from pipeline.train.faults import Faults
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


def due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def evaluate(engine: Engine, spec: DataSpec, cfg: Config, env: WorkerEnv) -> dict[str, float]:
    """One pass over the val shards, split across ranks; sums are all-reduced."""
    dist.average_buffers(engine.module)
    engine.train(False)
    sums = torch.zeros(3, device=env.device)
    batches = eval_batches(spec, cfg.data, env.rank, env.world_size)
    dummy = torch.zeros(1, *spec.sample_shape, device=env.device)
    while True:
        batch = next(batches, None)
        # Ranks may hold different numbers of val batches. Under ZeRO-3 every forward is a collective
        # (parameter all-gather), so all ranks loop until none has data; a rank that ran out runs a
        # forward on a dummy input and discards it.
        has_data = torch.tensor([0.0 if batch is None else 1.0], device=env.device)
        if dist.all_reduce(has_data, "max").item() == 0:
            break
        if batch is None:
            engine(dummy)
            continue
        x = normalize(batch.x.to(env.device), spec.mean, spec.std)
        sums += classify.eval_sums(engine, x, batch.y.to(env.device))
    engine.train(True)
    return classify.eval_metrics(dist.all_reduce(sums))


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

    # Same seed on every rank for the initial weights (ZeRO-3 partitions each rank's own copy),
    # then a per-rank seed so dropout masks differ between ranks.
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model.name, cfg.model.args, spec.sample_shape, spec.num_classes)
    if not resume_from:  # a resumed fine-tuning run gets its weights from its own checkpoint
        finetune.apply_init(model, cfg.init_from)
    frozen = finetune.freeze(model, cfg.init_from)
    load_dir, load_tag, universal = (
        persist.prepare_engine_load(resume_from, env.world_size, "model", env.is_rank0)
        if resume_from
        else (None, None, False)
    )
    engine = build_engine(
        "model",
        model,
        optim=cfg.optim,
        train=cfg.train,
        precision=cfg.precision,
        zero=cfg.zero,
        raw=cfg.deepspeed,
        micro_batch_size=cfg.data.batch_size,
        load_universal=universal,
        lr_mult=cfg.init_from.lr_mult,
        delayed=frozen if cfg.init_from.unfreeze_at_step else None,
        start_step=cfg.init_from.unfreeze_at_step,
    )
    torch.manual_seed(cfg.seed * 100_003 + env.rank)
    if resume_from:
        engine.load(load_dir, load_tag)
        state = TrainState.from_dict(commit.read_state(Path(resume_from)))  # step, run id, cursor, RNG ...
        state.config_digest, state.world_size = cfg.digest(), env.world_size

    tracker = make_tracker(
        env.is_rank0, run_dir, cfg.train.max_steps, cfg.tracking.wandb, cfg.to_dict(), state.run_id, cfg.name
    )
    tracker.event(
        "start",
        world_size=env.world_size,
        zero_stage=cfg.zero.stage,
        precision=cfg.precision,
        run_id=state.run_id,
    )
    if attempt:
        tracker.event("restart", attempt=attempt)
    if resume_from:
        tracker.event(
            "resume",
            from_step=state.step,
            checkpoint=resume_from,
            universal=universal,
            weights=engine.weights_checksum(),
        )
    cursor = data_cursor.Cursor.from_dict(state.data_cursor) if state.data_cursor else None
    batches = TrainBatches(
        spec, cfg.data, env.rank, env.world_size, cfg.seed, cursor, pin_memory=env.device.startswith("cuda")
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
    checkpointer = persist.Checkpointer(cfg, spec, env.is_rank0, env.world_size, tracker)
    resumed_at = state.step
    preempted = False

    window_loss = torch.zeros((), device=env.device)
    window_start, window_steps, window_wait_s = time.perf_counter(), 0, batches.wait_s
    engine.train(True)
    for step in range(state.step + 1, cfg.train.max_steps + 1):
        faults.at_step_start(step)
        step_keys: list[str] = []
        skipped = False
        for _ in range(cfg.train.grad_accum):
            batch = next_good_batch(batches, counters)
            step_keys += batch.keys
            x = normalize(batch.x.to(env.device, non_blocking=True), spec.mean, spec.std)
            y = batch.y.to(env.device, non_blocking=True)
            loss, _ = classify.train_step(engine, x, y)
            if faults.nan_loss(step):
                loss = loss * float("nan")
            # One tiny all-reduce per micro-batch, and the step's only host sync: every rank must agree
            # to skip a non-finite loss (a rank that steps alone would deadlock ZeRO's collectives), to
            # stop for a preemption at the same step, and on when all background checkpoint writes are
            # done (then the commit, itself collective, cannot block).
            flags = torch.stack(
                [
                    (~torch.isfinite(loss.detach())).float(),
                    loss.new_tensor(stop.requested()),
                    loss.new_tensor(checkpointer.busy()),
                ]
            )
            flags = dist.all_reduce(flags.float(), "max").tolist()
            if flags[0]:
                skipped = True
                if cfg.train.grad_accum == 1:
                    break  # no backward, no optimizer step: the weights stay as they were
                continue  # with accumulation, the bad micro-batch is dropped (the others are kept)
            engine.backward(loss)
            engine.step()  # updates weights and LR on the accumulation boundary only
            window_loss += loss.detach().float()
        state.step = step
        window_steps += 1
        if skipped:
            nonfinite_in_a_row += 1
            state.nonfinite_steps += 1
            tracker.event(
                "nonfinite", step=step, in_a_row=nonfinite_in_a_row, weights=engine.weights_checksum()
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
        if resume_from and step == resumed_at + 1:  # recovery time: restart/resume event -> here
            tracker.event("first_step_after_resume", step=step)

        if due(step, cfg.train.log_every) or step == cfg.train.max_steps:
            # Host syncs once per log interval: counters, the mean loss.
            counters.sync(state, tracker, cfg, spec, env.device)
            done_micro = max(1, window_steps * cfg.train.grad_accum)
            mean_loss = dist.all_reduce(window_loss / done_micro) / env.world_size
            elapsed_s = time.perf_counter() - window_start
            metrics = {
                "train/loss": mean_loss.item(),
                "train/lr": engine.lr()[0],
                "train/samples_per_s": window_steps
                * cfg.data.batch_size
                * cfg.train.grad_accum
                * env.world_size
                / elapsed_s,
                "train/data_wait_frac": (batches.wait_s - window_wait_s) / elapsed_s,
                "train/samples_seen": state.samples_seen,
                "train/epoch": batches.epoch,
            }
            if state.samples_skipped:
                metrics["train/samples_skipped"] = state.samples_skipped
            if state.nonfinite_steps:
                metrics["train/nonfinite_steps"] = state.nonfinite_steps
            if (grad_norm := engine.grad_norm()) is not None:
                metrics["train/grad_norm"] = grad_norm
            tracker.log(step, metrics)
            final.update(metrics)
            window_loss.zero_()
            window_start, window_steps, window_wait_s = time.perf_counter(), 0, batches.wait_s

        preempted = bool(flags[1])
        if due(step, cfg.train.eval_every) or (step == cfg.train.max_steps and not preempted):
            eval_metrics = evaluate(engine, spec, cfg, env)
            tracker.log(step, eval_metrics)
            final.update(eval_metrics)
            best = state.best.get("eval/accuracy", float("-inf"))
            state.best["eval/accuracy"] = max(best, eval_metrics["eval/accuracy"])
            window_start = time.perf_counter()  # eval time is not training throughput

        if checkpointer.pending is not None and not flags[2]:
            checkpointer.finish(must_commit=False)
        if due(step, cfg.checkpoint.every) or step == cfg.train.max_steps or preempted:
            counters.sync(state, tracker, cfg, spec, env.device)
            last = step == cfg.train.max_steps or preempted  # committed before the process may exit
            checkpointer.save(engine, state, batches, final, lambda: faults.in_save(state.step), wait=last)
            if checkpointer.last_commit is not None:
                final["checkpoint"] = str(checkpointer.last_commit)
            window_start = time.perf_counter()
        if preempted:
            tracker.event("preempted", step=step, signal=stop.signalled)
            break

    checkpointer.close()
    if "eval/accuracy" not in final and not preempted:  # resumed a finished run: report where it stands
        final.update(evaluate(engine, spec, cfg, env))
    final |= {
        "step": state.step,
        "run_id": state.run_id,
        "best/eval/accuracy": state.best.get("eval/accuracy"),
        "samples_skipped": state.samples_skipped,
        "preempted": preempted,
    }
    tracker.event("finish", step=state.step, samples_skipped=state.samples_skipped, preempted=preempted)
    tracker.close(summary=final)
    if ledger is not None:
        ledger.close()
    batches.close()
    return final
