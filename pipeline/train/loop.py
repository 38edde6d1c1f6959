"""The one training loop, run by every worker: build, (resume), for step ..., eval/save/log when due.

Collectives every rank must reach in the same order: engine creation, the loss all-reduce at log
steps, evaluation (every forward under ZeRO-3 gathers parameters), and checkpoint saves. Whether
they are due depends only on `step`, which all ranks share, so no rank can skip one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline import models
from pipeline.checkpoint import commit
from pipeline.config import Config
from pipeline.data.shards import DataSpec
from pipeline.data.stream import eval_loader, train_loader
from pipeline.engine import Engine, build_engine
from pipeline.tasks import classify
from pipeline.tracking import make_tracker
from pipeline.train.state import TrainState


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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def average_buffers(module: torch.nn.Module, world_size: int) -> None:
    """Average floating buffers (BatchNorm running statistics) over ranks.

    DeepSpeed, unlike DDP, never syncs buffers, so each rank's BatchNorm statistics drift apart from
    its own shards. Averaging them before eval and save makes eval, the checkpoint and the exported
    model agree (timm's `distribute_bn(reduce=True)` does the same). Collective: all ranks call it.
    """
    if not dist.is_initialized() or world_size == 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(world_size)


def evaluate(engine: Engine, spec: DataSpec, cfg: Config, env: WorkerEnv) -> dict[str, float]:
    """One pass over the val shards, split across ranks; sums are all-reduced."""
    average_buffers(engine.module, env.world_size)
    engine.train(False)
    sums = torch.zeros(3, device=env.device)
    batches = iter(eval_loader(spec, cfg.data, env.rank, env.world_size))
    dummy = torch.zeros(1, *spec.sample_shape, device=env.device)
    while True:
        batch = next(batches, None)
        # Ranks may hold different numbers of val batches. Under ZeRO-3 every forward is a collective
        # (parameter all-gather), so all ranks loop until none has data; a rank that ran out runs a
        # forward on a dummy input and discards it.
        has_data = torch.tensor([0.0 if batch is None else 1.0], device=env.device)
        if _all_reduce(has_data, dist.ReduceOp.MAX if dist.is_initialized() else None).item() == 0:
            break
        if batch is None:
            engine(dummy)
            continue
        x, y = (t.to(env.device, non_blocking=True) for t in batch)
        sums += classify.eval_sums(engine, x, y)
    engine.train(True)
    return classify.eval_metrics(_all_reduce(sums))


def _model_metadata(cfg: Config, spec: DataSpec) -> dict[str, Any]:
    return {
        "model": {
            "name": cfg.model.name,
            "args": cfg.model.args,
            "input_shape": spec.sample_shape,
            "num_classes": spec.num_classes,
        },
        "data": {"mean": spec.mean, "std": spec.std, "classes": spec.classes},
        "precision": cfg.precision,
        "zero_stage": cfg.zero.stage,
    }


def run(cfg: Config, spec: DataSpec, env: WorkerEnv, resume_from: str | None = None) -> dict[str, Any]:
    """Train to `train.max_steps`, continuing from `resume_from` (a verified checkpoint) if given.
    Returns the final metrics (the same on every rank)."""
    torch.set_num_threads(cfg.train.torch_threads or cfg.cluster.cpus_per_worker)
    run_dir = cfg.resolved_run_dir
    state = TrainState(
        run_id=env.run_id or TrainState().run_id, config_digest=cfg.digest(), world_size=env.world_size
    )

    # Same seed on every rank for the initial weights (ZeRO-3 partitions each rank's own copy),
    # then a per-rank seed so dropout masks differ between ranks.
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model.name, cfg.model.args, spec.sample_shape, spec.num_classes)
    engine = build_engine(
        "model",
        model,
        optim=cfg.optim,
        train=cfg.train,
        precision=cfg.precision,
        zero=cfg.zero,
        raw=cfg.deepspeed,
        micro_batch_size=cfg.data.batch_size,
    )
    if resume_from:
        # TODO(data cursor): the stream restarts at its epoch 0 here; exact mid-epoch resume of the
        # data comes with the stream cursor.
        engine.load(Path(resume_from) / "engines" / engine.name, commit.ENGINE_TAG)
        state = TrainState.from_dict(commit.read_state(Path(resume_from)))  # step, run id, best ...
        state.config_digest, state.world_size = cfg.digest(), env.world_size
    torch.manual_seed(cfg.seed * 100_003 + env.rank + 7919 * state.step)

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
    if resume_from:
        tracker.event("resume", from_step=state.step, checkpoint=resume_from)
    batches = iter(
        train_loader(
            spec, cfg.data, env.rank, env.world_size, cfg.seed, pin_memory=env.device.startswith("cuda")
        )
    )
    samples_per_step = cfg.data.batch_size * cfg.train.grad_accum * env.world_size
    final: dict[str, Any] = {}

    window_loss = torch.zeros((), device=env.device)
    window_start, window_steps, window_wait_s = time.perf_counter(), 0, 0.0
    engine.train(True)
    for step in range(state.step + 1, cfg.train.max_steps + 1):
        for _ in range(cfg.train.grad_accum):
            wait_start = time.perf_counter()
            x, y = next(batches)
            window_wait_s += time.perf_counter() - wait_start
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            loss, _ = classify.train_step(engine, x, y)
            engine.backward(loss)
            engine.step()  # updates weights and LR on the accumulation boundary only
            window_loss += loss.detach().float()
        state.step, state.samples_seen = step, state.samples_seen + samples_per_step
        window_steps += 1

        if due(step, cfg.train.log_every) or step == cfg.train.max_steps:
            # The only host sync of the training step path: once per log interval.
            mean_loss = _all_reduce(window_loss / (window_steps * cfg.train.grad_accum)) / env.world_size
            elapsed_s = time.perf_counter() - window_start
            metrics = {
                "train/loss": mean_loss.item(),
                "train/lr": engine.lr()[0],
                "train/samples_per_s": window_steps * samples_per_step / elapsed_s,
                "train/data_wait_frac": window_wait_s / elapsed_s,
                "train/samples_seen": state.samples_seen,
            }
            if (grad_norm := engine.grad_norm()) is not None:
                metrics["train/grad_norm"] = grad_norm
            tracker.log(step, metrics)
            final.update(metrics)
            window_loss.zero_()
            window_start, window_steps, window_wait_s = time.perf_counter(), 0, 0.0

        if due(step, cfg.train.eval_every) or step == cfg.train.max_steps:
            eval_metrics = evaluate(engine, spec, cfg, env)
            tracker.log(step, eval_metrics)
            final.update(eval_metrics)
            best = state.best.get("eval/accuracy", float("-inf"))
            state.best["eval/accuracy"] = max(best, eval_metrics["eval/accuracy"])
            window_start = time.perf_counter()  # eval time is not training throughput

        if due(step, cfg.checkpoint.every) or step == cfg.train.max_steps:
            average_buffers(engine.module, env.world_size)  # the saved statistics are every rank's
            path = commit.save(
                [engine],
                state.to_dict(),
                cfg.checkpoint_dir,
                step,
                is_rank0=env.is_rank0,
                barrier=_barrier,
                metadata={
                    **_model_metadata(cfg, spec),
                    "world_size": env.world_size,
                    "config_digest": state.config_digest,
                },
                keep_last=cfg.checkpoint.keep_last,
            )
            tracker.event("checkpoint_commit", step=step, path=str(path))
            final["checkpoint"] = str(path)
            window_start = time.perf_counter()

    final |= {
        "step": state.step,
        "run_id": state.run_id,
        "best/eval/accuracy": state.best.get("eval/accuracy"),
    }
    tracker.event("finish", step=state.step)
    tracker.close(summary=final)
    return final
