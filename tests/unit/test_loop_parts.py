"""The loop's parts in one process on one rank, with small fakes instead of DeepSpeed and the loader
(the way torchtitan tests its train step): `train_step`, the meter, the agreement's flags and the
checkpoint policy's commit rule. The dist, integration and faults tiers run the real thing."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from pipeline import config, tasks
from pipeline.data.shards import DataSpec
from pipeline.data.stream import Batch
from pipeline.tasks.base import Step, Task
from pipeline.training.agreement import Agreement, Flags
from pipeline.training.build import RunContext, WorkerEnv
from pipeline.training.checkpoint_policy import CheckpointPolicy
from pipeline.training.faults import Faults
from pipeline.training.loop import NonFiniteLoss, train_step
from pipeline.training.meter import DataCounters, Meter, TooManyBadSamples
from pipeline.training.state import TrainState


class FakeEngine:
    """What the loop and `Step.update` use of an Engine: plain SGD on a module, with DeepSpeed's rule
    that `step()` updates only on every `grad_accum`-th call (its micro-step counter)."""

    can_discard_grads = False

    def __init__(self, module: nn.Module, grad_accum: int = 1, lr: float = 0.1) -> None:
        self.module = module
        self.grad_accum = grad_accum
        self.optimizer = torch.optim.SGD(module.parameters(), lr=lr)
        self.micro_steps = self.updates = 0
        self.measuring: list[bool] = []

    def __call__(self, x):
        return self.module(x)

    def train(self, mode=True):
        self.module.train(mode)

    def backward(self, loss):
        (loss / self.grad_accum).backward()

    def step(self):
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.updates += 1

    def discard_grads(self):
        self.optimizer.zero_grad(set_to_none=True)

    def abandon_accumulation(self):
        self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps -= self.micro_steps % self.grad_accum

    def measure_grad_norm(self, on):
        self.measuring.append(on)

    def weights_checksum(self):
        flat = torch.cat([p.detach().double().flatten() for p in self.module.parameters()])
        return float(flat.sum()), float((flat * flat).sum())


class Recorder:
    def __init__(self):
        self.events, self.logged = [], []

    def event(self, kind, **fields):
        self.events.append((kind, fields))

    def log(self, step, metrics):
        self.logged.append((step, metrics))


def batches(count, batch_size=4, features=3, nan_at=()):
    """`count` batches of 2 classes; a batch whose index is in `nan_at` holds a NaN input."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        x = torch.randn(batch_size, features, generator=gen)
        if i in nan_at:
            x[0, 0] = float("nan")
        out.append(
            Batch(x, torch.arange(batch_size) % 2, [f"s{i}-{j}" for j in range(batch_size)], (0, 0, 0, i))
        )
    return out


class FakeBatches:
    def __init__(self, items):
        self.items, self.wait_s, self.epoch = iter(items), 0.0, 0

    def __next__(self):
        return next(self.items)


def context(tmp_path, items, *, grad_accum=1, task: Task | None = None, max_nonfinite=3, faults=""):
    cfg = config.load(
        "configs/smoke.yaml",
        [
            f"run_dir={tmp_path}",
            f"train.grad_accum={grad_accum}",
            f"train.max_nonfinite_steps={max_nonfinite}",
            "data.train=unused",
        ],
    )
    spec = DataSpec([], [], 100, 0, [], [], [3], 2, [0.0], [1.0])
    torch.manual_seed(0)
    engines = {"model": FakeEngine(nn.Linear(3, 2), grad_accum)}
    tracker = Recorder()
    meter = Meter(samples_per_micro_batch=4, grad_accum=grad_accum, wait_s=lambda: 0.0)
    return RunContext(
        cfg=cfg,
        spec=spec,
        env=WorkerEnv(rank=0, world_size=1),
        task=task or tasks.build("classify", {}),
        engines=engines,
        state=TrainState(),
        batches=FakeBatches(items),
        tracker=tracker,
        counters=DataCounters(max_skip_fraction=0.5, train_samples=100),
        meter=meter,
        agreement=Agreement(
            faults=Faults(tmp_path, 0), stop_requested=lambda: False, writes_busy=lambda: False
        ),
        checkpoints=None,
        evaluator=None,
        stop=None,
        faults=Faults(tmp_path, 0),
        ledger=None,
        resume_from=None,
        startup_marks={"worker": time.time(), "engines": time.time(), "loop": time.time()},
    )


def test_a_step_updates_once_and_the_meter_averages_its_micro_batches(tmp_path):
    ctx = context(tmp_path, batches(4), grad_accum=2)
    before = ctx.engines["model"].module.weight.clone()
    flags = train_step(ctx, 1, measure_grad_norm=True)
    engine = ctx.engines["model"]
    assert flags == Flags(nonfinite=False, stop=False, writes_busy=False)
    assert engine.updates == 1 and engine.micro_steps == 2 and engine.measuring == [True]
    assert not torch.equal(before, engine.module.weight) and ctx.state.step == 1
    assert ctx.counters.good == 8  # two micro-batches of 4 samples
    train_step(ctx, 2, measure_grad_norm=False)
    metrics = ctx.meter.window_metrics()
    assert metrics["train/samples_per_s"] > 0 and 0 < metrics["train/loss"] < 10
    assert ctx.meter.steps == 0 and ctx.meter.sums == {}  # a new window
    assert [kind for kind, _ in ctx.tracker.events] == ["startup"]


def test_a_nan_micro_batch_skips_the_whole_step_and_keeps_the_accumulation_aligned(tmp_path):
    """Bug 1 in miniature: the second micro-batch of step 1 is non-finite. The step is skipped whole
    (no update, its first micro-batch's gradient dropped, the micro-step counter rewound), so step 2
    updates from its own two micro-batches only."""
    ctx = context(tmp_path, batches(4, nan_at={1}), grad_accum=2)
    engine = ctx.engines["model"]
    before = engine.module.weight.clone()
    flags = train_step(ctx, 1, measure_grad_norm=False)
    assert flags.nonfinite and engine.updates == 0 and engine.micro_steps == 0
    assert torch.equal(before, engine.module.weight) and ctx.state.nonfinite_steps == 1
    assert ctx.meter.sums == {}  # a skipped step's losses are not averaged in
    train_step(ctx, 2, measure_grad_norm=False)
    assert engine.updates == 1 and engine.micro_steps == 2

    # the same weights as a run that reads the same batches and skips step 1 whole
    reference = context(tmp_path / "ref", batches(4, nan_at={0, 1}), grad_accum=2)
    train_step(reference, 1, measure_grad_norm=False)
    train_step(reference, 2, measure_grad_norm=False)
    assert torch.equal(reference.engines["model"].module.weight, engine.module.weight)


def test_non_finite_steps_in_a_row_stop_the_run(tmp_path):
    ctx = context(tmp_path, batches(3, nan_at={0, 1}), max_nonfinite=2)
    train_step(ctx, 1, measure_grad_norm=False)
    with pytest.raises(NonFiniteLoss, match="max_nonfinite_steps=2"):
        train_step(ctx, 2, measure_grad_norm=False)
    assert [f["in_a_row"] for kind, f in ctx.tracker.events if kind == "nonfinite"] == [1, 2]


class UpdatesNothing(Task):
    """A task that computes a loss but never updates (a frozen probe, say)."""

    def train_step(self, step: Step):
        return {"loss": step.models["model"](step.x).float().mean().detach()}


def test_a_task_that_updates_nothing_still_agrees_on_stop_once_per_micro_batch(tmp_path):
    ctx = context(tmp_path, batches(2), task=UpdatesNothing())
    ctx.agreement.stop_requested = lambda: True
    flags = train_step(ctx, 1, measure_grad_norm=False)
    assert flags.stop and ctx.engines["model"].updates == 0


def test_step_update_skips_every_later_update_of_a_skipped_step():
    engine = FakeEngine(nn.Linear(3, 2))

    class Count:
        calls = 0

        def start(self, loss, *, update=0, engine=-1):
            Count.calls += 1
            assert (update, engine) == (Count.calls, 0)  # which update of the micro-batch, which engine
            return lambda: bool(torch.isfinite(loss))

    io = Step(x=torch.zeros(1, 3), y=torch.zeros(1), number=1, engines={"m": engine}, agree=Count())
    assert io.update("m", torch.tensor(float("nan"))) is False and io.skipped
    assert io.update("m", torch.tensor(1.0)) is False  # agreed again (all ranks do), changes nothing
    assert Count.calls == 2 and engine.micro_steps == 0 and io.updates == 2
    assert not hasattr(io.models["m"], "backward")  # task code cannot step an engine around update


def test_the_agreement_stops_a_task_whose_ranks_update_differently(monkeypatch, tmp_path):
    """What the all-reduce returns when rank A is at its 2nd update and rank B at its 1st: the max of
    (update, -update, engine, -engine) gives both extremes, and every rank raises the same error."""
    from pipeline.training import agreement as agreement_mod

    def max_over_ranks(local, op):
        other = local.clone()
        other[3:] = torch.tensor([1.0, -1.0, 0.0, -0.0])  # the other rank: update #1 of engine 0
        return lambda: torch.maximum(local, other)

    monkeypatch.setattr(agreement_mod.collectives, "all_reduce_async", max_over_ranks)
    agree = Agreement(faults=Faults(tmp_path, 0), stop_requested=lambda: False, writes_busy=lambda: False)
    assert agree.start(torch.tensor(1.0), update=1, engine=0)() is True
    with pytest.raises(agreement_mod.DivergedUpdates, match=r"update #1-#2.*same number of times"):
        agree.start(torch.tensor(1.0), update=2, engine=0)()


def test_bad_samples_past_the_budget_raise_on_sync(tmp_path):
    counters = DataCounters(max_skip_fraction=0.1, train_samples=10)
    bad = Batch(torch.zeros(1, 3), torch.zeros(1), ["k"], (0, 0, 0, 0))
    from pipeline.data.stream import Bad

    bad.bad = [Bad("shard-0.tar", f"b{i}", "decode error") for i in range(3)]
    counters.count(bad)
    recorder = Recorder()
    with pytest.raises(TooManyBadSamples, match="max_skip_fraction=0.1"):
        counters.sync(TrainState(), recorder.event)
    assert [f["key"] for kind, f in recorder.events] == ["b0", "b1", "b2"]


class FakePending:
    def __init__(self, step):
        self.step = step


def test_the_commit_waits_for_writes_or_the_lag_limit(tmp_path):
    """commit_if_ready: commit once no rank writes any more, or max_commit_lag_steps after the save."""
    policy = CheckpointPolicy.__new__(CheckpointPolicy)
    policy.cfg = config.load("configs/smoke.yaml", ["data.train=unused", "checkpoint.max_commit_lag_steps=5"])
    finished = []
    policy.finish = lambda must_commit=True: (
        finished.append(policy.pending.step),
        setattr(policy, "pending", None),
    )
    policy.pending = FakePending(10)
    policy.commit_if_ready(11, writes_busy=True)
    policy.commit_if_ready(14, writes_busy=True)
    assert finished == []
    policy.commit_if_ready(15, writes_busy=True)  # the lag limit: wait for the writes, commit
    assert finished == [10]
    policy.pending = FakePending(20)
    policy.commit_if_ready(21, writes_busy=False)  # every rank's writes are done
    assert finished == [10, 20]
    policy.commit_if_ready(22, writes_busy=False)  # nothing pending: nothing to do
    assert finished == [10, 20]
