"""Evaluation: the task's val metrics, image grids of generative tasks, the classifier score of
generated images, and the best value so far; in a run (collective: under ZeRO-3 every forward gathers
parameters) and for `pipeline eval` (a committed checkpoint, one process, no DeepSpeed)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline import models, tasks
from pipeline.checkpoint import commit, export
from pipeline.config import Config, DataConfig
from pipeline.data.shards import DataSpec
from pipeline.data.stream import eval_batches
from pipeline.data.transforms import normalize
from pipeline.engine import choose_precision, native_bf16
from pipeline.tasks.base import Model, Task, forward_only
from pipeline.training import collectives, experience
from pipeline.training.state import TrainState
from pipeline.vocab import Vocab


def val_metrics(
    models_: Mapping[str, Model], *, task: Task, spec: DataSpec, data: DataConfig, device: str
) -> dict[str, float]:
    """One pass over the val shards, split across ranks; the task's sums are all-reduced."""
    sums = torch.zeros(task.EVAL_SUMS, device=device)
    rank, world = collectives.rank_and_world()
    batches = eval_batches(spec, data, rank, world)
    dummy = torch.zeros(1, *spec.sample_shape, device=device)
    while True:
        batch = next(batches, None)
        # Ranks may hold different numbers of val batches. Under ZeRO-3 every forward is a collective
        # (parameter all-gather), so all ranks loop until none has data; a rank that ran out runs a
        # forward on a dummy input and discards it.
        has_data = torch.tensor([0.0 if batch is None else 1.0], device=device)
        if collectives.all_reduce(has_data, "max").item() == 0:
            break
        if batch is None:
            task.eval_dummy(models_, dummy)
            continue
        x = normalize(batch.x.to(device), spec.mean, spec.std)
        sums += task.eval_sums(models_, x, batch.y.to(device))
    return task.eval_metrics(collectives.all_reduce(sums))


class Evaluator:
    """In-run evaluation at due steps: val metrics, the sample grid (rank 0 writes
    samples/step_X.png and logs it), `eval/digit_score` with `task.score_classifier`, best tracking."""

    def __init__(
        self,
        *,
        engines: Mapping[str, Any],
        task: Task,
        spec: DataSpec,
        cfg: Config,
        device: str,
        is_rank0: bool,
        log_image: Callable[[int, str, Path], None],
        log_text: Callable[[int, str, Path, list[tuple[str, str]]], None] | None = None,
    ) -> None:
        self.engines, self.models = engines, forward_only(engines)
        self.task, self.spec, self.device, self.is_rank0 = task, spec, device, is_rank0
        self.data, self.seed, self.cfg = cfg.data, cfg.seed, cfg
        self.episodes = task.source == "environment"  # evaluated by episodes, not val shards
        self.samples_dir = cfg.resolved_run_dir / "samples"
        self.log_image, self.log_text = log_image, log_text
        draws = type(task).grid is not Task.grid  # a task that shows its outputs as an image grid
        self.fixed_x = fixed_inputs(spec, cfg.data, device) if draws and not self.episodes else None
        self.vocab = Vocab.from_manifest(spec.vocab, spec.classes) if spec.kind == "tokens" else None
        # under ZeRO-3 each forward is a collective: every rank generates (the same text), rank 0 writes
        self.all_ranks_generate = cfg.zero.stage == 3
        self.classifier = (
            load_classifier(cfg.task.score_classifier, device) if cfg.task.score_classifier else None
        )
        self.score_samples = cfg.task.score_samples

    def evaluate(self, step: int, state: TrainState) -> dict[str, float]:
        """Collective: every metric of this step; `state.best` keeps the task's best metric. The
        global RNG comes out as it went in (the val DataLoader draws its seed from it), so evaluating
        changes nothing the training stream or a checkpoint's RNG state sees: a run evaluated at step
        N and one that was not continue identically."""
        cuda = [torch.device(self.device)] if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=cuda):
            return self._evaluate(step, state)

    def _evaluate(self, step: int, state: TrainState) -> dict[str, float]:
        for engine in self.engines.values():
            collectives.average_buffers(engine.module)  # DeepSpeed never syncs BatchNorm statistics
            engine.train(False)
        try:
            if self.episodes:
                metrics = experience.evaluate_episodes(
                    self.models, task=self.task, cfg=self.cfg, spec=self.spec, device=self.device
                )
            else:
                metrics = val_metrics(
                    self.models, task=self.task, spec=self.spec, data=self.data, device=self.device
                )
            self._write_grid(step)
            self._write_text(step)
            if self.classifier is not None:
                score = self._classifier_score()
                if score is not None:
                    metrics["eval/digit_score"] = score
        finally:
            for engine in self.engines.values():
                engine.train(True)
        best, value = state.best.get(self.task.best_metric), metrics.get(self.task.best_metric)
        if value is not None and (
            best is None or (value > best if self.task.best_mode == "max" else value < best)
        ):
            state.best[self.task.best_metric] = value
        return metrics

    def _write_grid(self, step: int) -> None:
        if self.fixed_x is None:
            return
        images = self.task.grid(self.models, self.fixed_x)
        if images is not None and self.is_rank0:
            path = write_grid(images, self.spec, self.samples_dir / f"step_{step:08d}.png")
            self.log_image(step, "samples/grid", path)

    def _write_text(self, step: int) -> None:
        """A token task's generated text from its fixed prompts, seeded by the run's seed (the same
        draws at every eval and after a resume), to samples/step_X.txt and the tracker."""
        if self.vocab is None or not (self.is_rank0 or self.all_ranks_generate):
            return
        rng = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            samples = self.task.text_samples(self.models, vocab=self.vocab, rng=rng, device=self.device)
        if samples and self.is_rank0:
            path = write_text_samples(samples, step, self.samples_dir / f"step_{step:08d}.txt")
            if self.log_text is not None:
                self.log_text(step, "samples/text", path, samples)

    @torch.no_grad()
    def _classifier_score(self) -> float | None:
        """The Inception Score of generated images under the digit classifier: exp(E_x KL(p(y|x) ||
        p(y))). 1 for samples the classifier cannot tell apart, up to the number of classes (10) for
        confident, varied digits. Every rank generates its share (a collective under ZeRO-3); sums
        are all-reduced. None for a task that generates nothing."""
        rank, world = collectives.rank_and_world()
        samples = self.score_samples
        mine = samples // world + (1 if rank < samples % world else 0)
        rng = torch.Generator().manual_seed(self.seed + rank)  # leaves the training RNG alone
        images = self.task.sample_images(self.models, mine, rng)
        if images is None:
            return None
        assert self.classifier is not None
        probs = self.classifier.probabilities(images, self.spec)[:mine]
        plogp = (probs * probs.clamp_min(1e-12).log()).sum()
        sums = torch.cat([plogp.view(1), probs.sum(dim=0), torch.tensor([float(mine)], device=probs.device)])
        sums = collectives.all_reduce(sums.to(self.device))
        count = sums[-1].item()
        marginal = sums[1:-1] / count
        mean_kl = sums[0].item() / count - float((marginal * marginal.clamp_min(1e-12).log()).sum())
        return math.exp(mean_kl)


def fixed_inputs(spec: DataSpec, data: DataConfig, device: str, count: int = 8) -> torch.Tensor:
    """The first `count` val images (the same on every rank and at every eval), normalised."""
    # Starting a DataLoader draws a seed from the global RNG; a resumed run restores that RNG before
    # it gets here, so drawing from it would shift every later random number against the unbroken run.
    with torch.random.fork_rng(devices=[]):
        batch = next(eval_batches(spec, data, rank=0, world_size=1))
    return normalize(batch.x[:count].to(device), spec.mean, spec.std)


def write_text_samples(samples: list[tuple[str, str]], step: int, path: Path) -> Path:
    """Generated text as a file a person reads: each prompt, then its continuation."""
    parts = [f"# step {step}: {len(samples)} prompt(s), each followed by its generated continuation\n"]
    for prompt, continuation in samples:
        parts.append(f"\n=== prompt {prompt!r}\n{prompt}{continuation}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path


def write_grid(images: torch.Tensor, spec: DataSpec, path: Path, columns: int = 8) -> Path:
    """Save (N, C, H, W) images in the data's normalised space as one PNG grid."""
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    pixels = (images.detach().float().cpu() * std + mean).clamp(0, 1)
    n, c, h, w = pixels.shape
    rows = math.ceil(n / columns)
    grid = torch.ones(c, rows * (h + 1) + 1, columns * (w + 1) + 1)  # 1-pixel white borders
    for i in range(n):
        top, left = 1 + (i // columns) * (h + 1), 1 + (i % columns) * (w + 1)
        grid[:, top : top + h, left : left + w] = pixels[i]
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[:, :, 0] if c == 1 else array).resize(
        (array.shape[1] * 4, array.shape[0] * 4), Image.NEAREST
    ).save(path)
    return path


@dataclass
class Classifier:
    """A classifier trained by the pipeline, as a plain module, with the normalisation it expects."""

    module: nn.Module
    mean: list[float]
    std: list[float]

    def probabilities(self, images: torch.Tensor, spec: DataSpec) -> torch.Tensor:
        """Class probabilities of images given in `spec`'s normalised space."""
        pixels = images * _channels(spec.std, images) + _channels(spec.mean, images)
        x = (pixels - _channels(self.mean, images)) / _channels(self.std, images)
        return self.module(x).float().softmax(dim=1)


def _channels(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def load_classifier(target: str, device: str) -> Classifier:
    """A classifier checkpoint (or run dir) of the pipeline, verified before anything is unpickled."""
    ckpt = commit.find(Path(target))
    if ckpt is None:
        raise commit.CheckpointError(f"config key 'task.score_classifier': no checkpoint at {target}")
    manifest = commit.read_manifest(ckpt)
    meta = manifest["model"]
    model = models.build(meta["name"], meta["args"], meta["input_shape"], meta["num_classes"])
    model.load_state_dict(export.consolidated_state_dict(ckpt), strict=True)  # verifies the files first
    return Classifier(model.to(device).eval(), manifest["data"]["mean"], manifest["data"]["std"])


def find_checkpoint(target: Path) -> Path:
    """A checkpoint dir, or the newest commit of a run dir (`pipeline eval`)."""
    ckpt = commit.find(target)
    if ckpt is None:
        raise commit.CheckpointError(f"{target} is neither a checkpoint nor a run dir with one")
    return ckpt


def evaluate_checkpoint(cfg: Config, spec: DataSpec, ckpt: Path) -> dict[str, Any]:
    """`pipeline eval`: the run's task metrics of a checkpoint from every engine's consolidated fp32
    weights, in one process without DeepSpeed, in the precision the run would choose here."""
    manifest = commit.read_manifest(ckpt)
    meta = manifest["model"]
    model = models.build(
        meta["name"], meta["args"], meta["input_shape"], meta["num_classes"], meta.get("action_space")
    )
    task_meta = manifest.get("task", {"name": "classify", "args": {}})
    task = tasks.build(task_meta["name"], task_meta["args"])
    parts = task.split(model)
    for name, module in parts.items():  # verifies the files first
        module.load_state_dict(export.consolidated_state_dict(ckpt, name), strict=True)
    model.eval()
    mean, std = task.normalization(spec.mean, spec.std)
    spec = dataclasses.replace(spec, mean=mean, std=std)
    precision, _ = choose_precision(cfg.precision, native=native_bf16("cpu"), device="cpu")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        if task.source == "environment":  # env.eval_episodes episodes of the deterministic policy
            metrics = experience.evaluate_episodes(
                forward_only(parts), task=task, cfg=cfg, spec=spec, device="cpu"
            )
        else:
            metrics = val_metrics(forward_only(parts), task=task, spec=spec, data=cfg.data, device="cpu")
    return {"checkpoint": str(ckpt), "step": manifest["step"], **metrics}
