"""`pipeline bench overhead`: steady-state seconds per step of `pipeline train` (Ray workers, our loop,
DeepSpeed ZeRO-0/1/2, data streamed from shards) against a plain PyTorch DDP loop (torch.distributed
with gloo, 2 processes, no Ray, no DeepSpeed) on the same model, task, batch, precision, optimizer and
thread count, with its batches in memory. Also the input stall: the fraction of the pipeline's step
time spent waiting for data.

Both sides run the recipe's own task code (`task.train_step`), so the math is identical: the DDP side
wraps each module in DistributedDataParallel behind the small engine interface the tasks call.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import config as config_mod
from pipeline.bench import find_config, median, row
from pipeline.net import free_port

# recipe: (config, steps per log window, measured windows, warm-up windows). The pipeline's warm-up
# covers about its first epoch on MNIST-5k (2,000 samples a rank: 32 steps), while the loader
# processes read and decode every shard once and `data.cache_mb` fills; then epochs come from memory.
# ResNet-18 and the DCGAN load in ~9 ms of a 170-250 ms step, so their steady state needs no full
# epoch. The DDP loop, fed from memory from the start, warms up for one window. (Three measured
# windows keep the default run, 8 `pipeline train` starts included, under 5 minutes here.)
RECIPES = {
    "cnn": ("cnn-mnist5k", 20, 3, 2),
    "resnet18": ("resnet18-mnist5k", 5, 3, 2),
    "lstm": ("lstm-rows-mnist5k", 10, 3, 3),
    "dcgan": ("dcgan-mnist5k", 10, 3, 2),
}


class DDPEngine:
    """What `Step.update` calls on an engine, over a plain DDP module and a torch optimizer."""

    can_discard_grads = False  # agree, then backward: no collective at all with NoAgreement

    def __init__(
        self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: str, clip_grad_norm: float
    ) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.ddp = DistributedDataParallel(module)
        self.optimizer = optimizer
        self.autocast = precision == "bf16"
        self.clip_grad_norm = clip_grad_norm  # the recipe's clipping, as DeepSpeed applies it for us

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            return self.ddp(*args, **kwargs)

    @property
    def module(self) -> torch.nn.Module:
        return self.ddp.module

    def train(self, mode: bool = True) -> None:
        self.ddp.train(mode)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.ddp.parameters(), self.clip_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class NoAgreement:
    """Plain DDP loops skip nothing: every loss is taken as agreed, without a collective."""

    def start(self, loss: torch.Tensor, *, update: int = 0, engine: int = -1) -> Any:
        return lambda: True


def _ddp_worker(
    rank: int, world_size: int, port: int, recipe: str, cfg_dict: dict, spec_dict: dict, out: str
) -> None:
    import torch.distributed as dist

    from pipeline import models, tasks
    from pipeline.data.shards import DataSpec
    from pipeline.data.transforms import normalize
    from pipeline.engine import choose_precision, make_optimizer, native_bf16, param_groups
    from pipeline.tasks.base import Step

    cfg = config_mod.from_dict(cfg_dict)
    spec = DataSpec.from_dict(spec_dict)
    # precision=auto resolves as `pipeline train` resolves it on this CPU: both sides compute alike
    precision, _ = choose_precision(cfg.precision, native=native_bf16("cpu"), device="cpu")
    torch.set_num_threads(cfg.train.torch_threads or cfg.cluster.cpus_per_worker)
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    task = tasks.build(cfg.task.name, cfg.task.args)
    mean, std = task.normalization(spec.mean, spec.std)
    torch.manual_seed(cfg.seed)
    model = models.build(
        cfg.model.name, cfg.model.args, spec.sample_shape, task.num_outputs(spec.num_classes)
    )
    engines = {}
    for name, module in task.split(model).items():
        optim = cfg.optim_for(name)
        engines[name] = DDPEngine(
            module,
            make_optimizer(param_groups(module, optim.weight_decay), optim),
            precision,
            cfg.train.clip_grad_norm,
        )
    # Batches in memory, as the loader hands them over (uint8 HWC); normalized every step, as ours.
    c, h, w = spec.sample_shape
    batches = [
        (
            torch.randint(0, 256, (cfg.data.batch_size, h, w, c), dtype=torch.uint8),
            torch.randint(0, max(1, spec.num_classes), (cfg.data.batch_size,)),
        )
        for _ in range(8)
    ]
    _, window, windows, _ = RECIPES[recipe]
    agree = NoAgreement()
    per_step: list[float] = []
    start = time.perf_counter()
    for step in range(1, window * (windows + 1) + 1):
        x, y = batches[step % len(batches)]
        task.train_step(Step(x=normalize(x, mean, std), y=y, number=step, engines=engines, agree=agree))
        if step % window == 0:
            now = time.perf_counter()
            if step > window:  # the first window is warm-up
                per_step.append((now - start) / window)
            start = now
    if rank == 0:
        Path(out).write_text(json.dumps(per_step))
    # Both ranks leave together: a rank that tears its gloo connections down while the other still
    # uses them can make the other's gloo thread throw, and abort that process (seen once in CI as
    # "process 0 terminated with signal SIGABRT").
    dist.barrier()
    dist.destroy_process_group()


def bench_config(recipe: str, data: Path, run_dir: Path, stage: int, *extra: str) -> config_mod.Config:
    name, window, windows, warmup = RECIPES[recipe]
    cfg = config_mod.load(
        find_config(name),
        [
            f"data.train={data}",
            f"run_dir={run_dir}",
            f"zero.stage={stage}",
            f"train.max_steps={window * (windows + warmup)}",
            f"train.log_every={window}",
            "train.eval_every=0",
            "checkpoint.every=0",
            "resume=never",
            "tracking.wandb.mode=disabled",
            "cluster.launcher=ray",
            "optim.warmup_steps=1",
            *(["task.score_classifier=null"] if recipe == "dcgan" else []),
            *extra,
        ],
    )
    return cfg


def ddp_seconds_per_step(recipe: str, cfg: config_mod.Config, spec: Any) -> list[float]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "ddp.json")
        mp.spawn(
            _ddp_worker,
            args=(cfg.cluster.num_workers, free_port(), recipe, cfg.to_dict(), spec.to_dict(), out),
            nprocs=cfg.cluster.num_workers,
        )
        return json.loads(Path(out).read_text())


def pipeline_seconds_per_step(recipe: str, cfg: config_mod.Config) -> tuple[list[float], list[float]]:
    """(seconds per step, data-wait fraction) of each measured log window of a `pipeline train` run."""
    from pipeline import launch
    from pipeline.launch.plan import make_plan

    launch.train(make_plan(cfg))
    rows = [json.loads(line) for line in (cfg.resolved_run_dir / "metrics.jsonl").read_text().splitlines()]
    warmup = RECIPES[recipe][3]
    windows = [r for r in rows if "train/samples_per_s" in r][warmup:]
    samples_per_step = cfg.data.batch_size * cfg.train.grad_accum * cfg.cluster.num_workers
    return (
        [samples_per_step / r["train/samples_per_s"] for r in windows],
        [r["train/data_wait_frac"] for r in windows],
    )


def run(recipes: list[str], stages: list[int], data: Path, repeats: int = 1) -> list[dict[str, Any]]:
    """The overhead table: per recipe, DDP's s/step, then each ZeRO stage's s/step against it, and the
    input stall. Medians over the measured windows of `repeats` runs of each (interleaved)."""
    from pipeline.launch.plan import make_plan

    rows: list[dict[str, Any]] = []
    for recipe in recipes:
        with tempfile.TemporaryDirectory(prefix=f"bench-{recipe}-") as tmp:
            ddp: list[float] = []
            ours: dict[int, list[float]] = {s: [] for s in stages}
            waits: dict[int, list[float]] = {s: [] for s in stages}
            for repeat in range(repeats):
                base = bench_config(recipe, data, Path(tmp) / "ddp", 0)
                ddp += ddp_seconds_per_step(recipe, base, make_plan(base).spec)
                for stage in stages:
                    cfg = bench_config(recipe, data, Path(tmp) / f"z{stage}-{repeat}", stage)
                    per_step, wait = pipeline_seconds_per_step(recipe, cfg)
                    ours[stage] += per_step
                    waits[stage] += wait
            ddp_s = median(ddp)
            rows.append(row(f"{recipe}: DDP loop (gloo, in-memory batches)", ddp_s, "s/step"))
            for stage in stages:
                rows.append(row(f"{recipe}: pipeline ZeRO-{stage}", median(ours[stage]), "s/step", ddp_s))
            for stage in stages:
                rows.append(row(f"{recipe}: input stall ZeRO-{stage}", median(waits[stage]), "fraction"))
    return rows
