"""Everything a worker's run needs, built once, in one order, and closed on every exit path.

The collectives of building, in the order every rank reaches them (a rank that skipped one would
leave the others waiting): the precision agreement, the restart count (broadcast), the resume point
(broadcast), engine creation and loading (DeepSpeed broadcasts and partitions; a universal conversion
is broadcast), the start summary (one gather). The loop's own collectives are listed in loop.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import models, tasks
from pipeline.checkpoint import commit, store, trust
from pipeline.config import Config
from pipeline.data import cursor as data_cursor
from pipeline.data.shards import DataSpec
from pipeline.data.stream import Batch, TrainBatches
from pipeline.engine import (
    Engine,
    build_engine,
    choose_precision,
    compile_seconds,
    forced_bf16_warning,
    native_bf16,
)
from pipeline.tasks.base import Task
from pipeline.tracking import JsonlWriter, make_tracker
from pipeline.training import activations, collectives, experience, finetune, resume, telemetry
from pipeline.training.agreement import Agreement
from pipeline.training.checkpoint_policy import CheckpointPolicy, weights_checksum
from pipeline.training.evaluator import Evaluator
from pipeline.training.faults import Faults
from pipeline.training.meter import DataCounters, Meter
from pipeline.training.signals import StopRequest
from pipeline.training.state import TrainState


@dataclass
class WorkerEnv:
    """Who this worker is; filled by the launcher (Ray, or the local process launcher)."""

    rank: int
    world_size: int
    device: str = "cpu"
    run_id: str = ""
    launch_id: str = ""  # the same for every restart of one launch (counts restarts)
    node: str | None = None  # this worker's node as the launcher names it (Ray's node IP)
    # wall-clock marks of the launch so far (process_start, launch, ray_ready) for the startup event
    startup_marks: dict[str, float] = field(default_factory=dict)

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


@dataclass
class RunContext:
    """One worker's run: the parts the loop calls, each built from its config slice."""

    cfg: Config
    spec: DataSpec  # in the task's normalisation (what the models see and grids undo)
    env: WorkerEnv
    task: Task
    engines: dict[str, Engine]
    state: TrainState
    batches: TrainBatches | experience.EnvironmentSource  # shards, or an environment task's environments
    tracker: Any
    counters: DataCounters
    meter: Meter
    agreement: Agreement
    checkpoints: CheckpointPolicy
    evaluator: Evaluator
    stop: StopRequest
    faults: Faults
    ledger: JsonlWriter | None
    resume_from: str | None
    startup_marks: dict[str, float]
    final: dict[str, Any] = field(default_factory=dict)  # the metrics returned at the end
    nonfinite_in_a_row: int = 0

    def next_batch(self) -> Batch:
        """The next batch with at least one good sample (skip mode can drop a whole batch)."""
        while True:
            batch = next(self.batches)
            self.counters.count(batch)
            if batch.keys:
                return batch


@contextlib.contextmanager
def build_run(cfg: Config, spec: DataSpec, env: WorkerEnv, resume_from: str | None):
    """Yield the RunContext of this worker; on any exit (a finished run, an exception) close what it
    opened: loader processes, checkpoint writer threads, the ledger, the tracker (W&B run)."""
    with contextlib.ExitStack() as stack:
        yield _build(cfg, spec, env, resume_from, stack)


def _build(
    cfg: Config, spec: DataSpec, env: WorkerEnv, resume_from: str | None, stack: contextlib.ExitStack
) -> RunContext:
    marks = {**env.startup_marks, "worker": time.time()}
    torch.set_num_threads(cfg.train.torch_threads or cfg.cluster.cpus_per_worker)
    run_dir = cfg.resolved_run_dir
    cfg, precision_reason = _agree_precision(cfg, env)
    state = TrainState(
        run_id=env.run_id or TrainState().run_id, config_digest=cfg.digest(), world_size=env.world_size
    )
    stop = StopRequest(run_dir)
    faults = Faults(run_dir, env.rank)
    restarts = resume.restart_count(run_dir, env.launch_id, env.is_rank0)
    resume_from = resume.agree_resume_point(cfg, resume_from, env.is_rank0)
    if env.is_rank0:
        store.for_config(cfg).remove_debris()  # partial saves and uploads of a run that died mid-write

    task = tasks.build(cfg.task.name, cfg.task.args)
    mean, std = task.normalization(spec.mean, spec.std)
    spec = dataclasses.replace(spec, mean=mean, std=std)  # the space the models see (and grids undo)
    engines, universal, init = build_engines(cfg=cfg, spec=spec, task=task, env=env, resume_from=resume_from)
    marks["engines"] = time.time()
    marks["compile_before"] = compile_seconds()  # torch.compile's timers count per process, not per run
    if resume_from:
        state = TrainState.from_dict(commit.read_state(Path(resume_from)))  # step, run id, cursor, RNG ...
        state.config_digest, state.world_size = cfg.digest(), env.world_size
    # resuming a rollback's own commit: the new line's run id (its trainer state names the old line's)
    line_id = store.line_run_id(cfg.checkpoint_dir, Path(resume_from)) if resume_from else None
    rolled_back_from = state.run_id if line_id and line_id != state.run_id else None
    if rolled_back_from:
        state.run_id = line_id

    tracker = make_tracker(
        is_rank0=env.is_rank0,
        run_dir=run_dir,
        total_steps=cfg.train.max_steps,
        wandb_cfg=cfg.tracking.wandb,
        config=cfg.to_dict(),
        run_id=state.run_id,
        name=cfg.name,
        resume_step=state.step if resume_from else 0,
    )
    # a no-op after the run's own close with its summary; after an exception, W&B marks the run failed
    stack.push(lambda exc_type, exc, tb: tracker.close(failed=exc_type is not None))
    batches = make_source(cfg, spec, env, task, state if resume_from else None)
    stack.callback(batches.close)
    summary = telemetry.start_summary(
        cfg=cfg,
        spec=spec,
        engines=engines,
        batches=batches,
        device=env.device,
        resume_step=state.step if resume_from else None,
        resume_from=resume_from,
        wandb_location=tracker.location(),
        node=env.node,
    )
    summary["precision_reason"] = precision_reason
    if init:
        summary["init_from"] = init  # what init_from loaded, excluded, adapted, held
    tracker.event("start", run_id=state.run_id, **summary)
    if isinstance(batches, experience.EnvironmentSource):
        summary["environment"] = f"{cfg.env.id} x {cfg.env.num_envs} per worker" + (
            "" if batches.restored or not resume_from else ", new episodes (another world size)"
        )
    if env.is_rank0:
        print(telemetry.format_start_summary(cfg.name, state.run_id, summary), flush=True)
    if restarts:
        tracker.event("restart", attempt=restarts)
    if rolled_back_from:
        tracker.event("rollback", to_step=state.step, run_id=state.run_id, abandoned_run_id=rolled_back_from)
    if resume_from:
        weights = weights_checksum(engines)
        tracker.event(
            "resume", from_step=state.step, checkpoint=resume_from, universal=universal, weights=weights
        )
    # RNG last: starting DataLoader processes draws from the global torch RNG, so restoring before
    # that would shift every later dropout mask against the unbroken run.
    if resume_from and len(state.rng) == env.world_size:
        resume.restore_rng(state.rng[env.rank])
    elif resume_from:  # another world size: per-rank streams cannot carry over; reseed from the step
        torch.manual_seed(cfg.seed * 100_003 + env.rank + 7919 * state.step)
    ledger = None
    if cfg.data.ledger:
        ledger = JsonlWriter(run_dir / "ledger" / f"rank{env.rank}.jsonl")
        stack.callback(ledger.close)
    counters = DataCounters(
        max_skip_fraction=cfg.data.max_skip_fraction, train_samples=spec.train_samples, device=env.device
    )
    checkpoints = CheckpointPolicy(
        cfg=cfg,
        spec=spec,
        num_outputs=task.num_outputs(spec.num_classes),
        engines=engines,
        state=state,
        batches=batches,
        counters=counters,
        tracker=tracker,
        faults=faults,
        is_rank0=env.is_rank0,
        world_size=env.world_size,
    )
    stack.callback(checkpoints.writer.close)  # after a failure: stop the writer threads, commit nothing
    agreement = Agreement(faults=faults, stop_requested=stop.requested, writes_busy=checkpoints.busy)
    evaluator = Evaluator(
        engines=engines,
        task=task,
        spec=spec,
        cfg=cfg,
        device=env.device,
        is_rank0=env.is_rank0,
        log_image=tracker.image,
        log_text=tracker.text,
    )
    meter = Meter(
        samples_per_micro_batch=samples_per_step(cfg, task, env.world_size),
        grad_accum=cfg.train.grad_accum,
        wait_s=lambda: batches.wait_s,
    )
    for engine in engines.values():
        engine.train(True)
    marks["loop"] = time.time()
    return RunContext(
        cfg=cfg,
        spec=spec,
        env=env,
        task=task,
        engines=engines,
        state=state,
        batches=batches,
        tracker=tracker,
        counters=counters,
        meter=meter,
        agreement=agreement,
        checkpoints=checkpoints,
        evaluator=evaluator,
        stop=stop,
        faults=faults,
        ledger=ledger,
        resume_from=resume_from,
        startup_marks=marks,
    )


def make_source(
    cfg: Config, spec: DataSpec, env: WorkerEnv, task: Task, state: TrainState | None
) -> TrainBatches | experience.EnvironmentSource:
    """The worker's training data: its shards from the resumed cursor, or (an environment task) its
    environments from the resumed environment states. `state`: the resumed TrainState, else None."""
    if task.source == "environment":
        return experience.EnvironmentSource(cfg, rank=env.rank, world_size=env.world_size, state=state)
    cursor = data_cursor.Cursor.from_dict(state.data_cursor) if state and state.data_cursor else None
    return TrainBatches(
        spec, cfg.data, env.rank, env.world_size, cfg.seed, cursor, pin_memory=env.device.startswith("cuda")
    )


def samples_per_step(cfg: Config, task: Task, world_size: int) -> int:
    """Samples of one micro-batch on all ranks; an environment task's are its environment steps, which
    the loop sets after each step (train/samples_per_s is then environment steps per second)."""
    return 0 if task.source == "environment" else cfg.data.batch_size * world_size


def _agree_precision(cfg: Config, env: WorkerEnv) -> tuple[Config, str]:
    """Collective: `precision: auto` becomes bf16 only when every rank's device computes it natively
    (one max all-reduce of "lacks it"), so all ranks train in the same precision."""
    lacks = torch.tensor([float(not native_bf16(env.device))], device=collectives.tensor_device())
    native = not collectives.all_reduce(lacks, "max").item()
    precision, reason = choose_precision(cfg.precision, native=native, device=env.device)
    warning = forced_bf16_warning(precision, native=native, device=env.device)
    if warning and env.is_rank0:
        warnings.warn(warning, stacklevel=1)
    return cfg.model_copy(update={"precision": precision}), reason


def _prefix_in(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def build_engines(
    *, cfg: Config, spec: DataSpec, task: Task, env: WorkerEnv, resume_from: str | None
) -> tuple[dict[str, Engine], bool, dict[str, Any]]:
    """Collective: {engine name: Engine} of `task`, loaded from `resume_from` if given; whether
    that load went through a universal checkpoint (another world size); what `init_from` did."""
    # Same seed on every rank for the initial weights (ZeRO-3 partitions each rank's own copy),
    # then a per-rank seed so dropout masks differ between ranks.
    torch.manual_seed(cfg.seed)
    model = models.build(
        cfg.model.name,
        cfg.model.args,
        spec.sample_shape,
        task.num_outputs(spec.num_classes),
        action_space=spec.action_space,
    )
    activations.apply(model, cfg.model.activation_checkpointing)  # validated by the plan
    init: dict[str, Any] = {}
    if not resume_from:  # a resumed fine-tuning run gets its weights from its own checkpoint
        init = finetune.apply_init(model, cfg.init_from)
    frozen = finetune.freeze(model, cfg.init_from)
    held = finetune.frozen_batchnorms(model, cfg.init_from)
    engines: dict[str, Engine] = {}
    loads: dict[str, tuple[Path, str, bool]] = {}
    universal = False
    for name, module in task.split(model).items():
        if resume_from:
            loads[name] = resume.prepare_engine_load(resume_from, env.world_size, name, env.is_rank0)
            universal = loads[name][2]
        prefix = _prefix_in(model, module)  # frozen names are the whole model's; an engine sees its own
        delayed = [n.removeprefix(f"{prefix}.") for n in frozen if not prefix or n.startswith(f"{prefix}.")]
        engines[name] = build_engine(
            name,
            module,
            optim=cfg.optim_for(name),
            train=cfg.train,
            precision=cfg.precision,
            zero=cfg.zero,
            raw=cfg.deepspeed,
            micro_batch_size=cfg.data.batch_size,
            load_universal=universal,
            lr_mult=cfg.init_from.lr_mult,
            delayed=delayed if cfg.init_from.unfreeze_at_step else None,
            start_step=cfg.init_from.unfreeze_at_step,
            updates_per_step=task.updates_per_step,
        )
        if held:  # until the step the engine's LR schedule unfreezes them (its count survives resume)
            steps = lambda e=engines[name]: e.ds.lr_scheduler.last_epoch  # noqa: E731
            n = finetune.hold_batchnorm_stats(module, held, cfg.init_from.unfreeze_at_step, steps)
            init["batchnorm_held"] = init.get("batchnorm_held", 0) + n
    torch.manual_seed(cfg.seed * 100_003 + env.rank)
    # DeepSpeed's loads ask torch for weights_only=False: tensors only, for any checkpoint (trust.py)
    with trust.tensors_only(*(load_dir for load_dir, _, _ in loads.values())):
        for name, (load_dir, load_tag, _) in loads.items():
            engines[name].load(load_dir, load_tag)
    if options := cfg.train.compile_options:  # after the load: compiling leaves names and state as they are
        for engine in engines.values():
            engine.compile(options)
    return engines, universal, init
