"""Evaluation inside a run: the task's val metrics, image grids of generative tasks, and the digit
score of GAN samples. All collective (under ZeRO-3 every forward gathers parameters)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline import models
from pipeline.checkpoint import commit, export
from pipeline.config import Config
from pipeline.data.shards import DataSpec
from pipeline.data.stream import eval_batches
from pipeline.data.transforms import normalize
from pipeline.tasks.base import Task
from pipeline.train import distributed as dist


def evaluate(
    engines: dict[str, Any], task: Task, spec: DataSpec, cfg: Config, device: str
) -> dict[str, float]:
    """One pass over the val shards, split across ranks; the task's sums are all-reduced."""
    for engine in engines.values():
        dist.average_buffers(engine.module)
        engine.train(False)
    sums = torch.zeros(task.EVAL_SUMS, device=device)
    rank, world = dist.rank_and_world()
    batches = eval_batches(spec, cfg.data, rank, world)
    dummy = torch.zeros(1, *spec.sample_shape, device=device)
    while True:
        batch = next(batches, None)
        # Ranks may hold different numbers of val batches. Under ZeRO-3 every forward is a collective
        # (parameter all-gather), so all ranks loop until none has data; a rank that ran out runs a
        # forward on a dummy input and discards it.
        has_data = torch.tensor([0.0 if batch is None else 1.0], device=device)
        if dist.all_reduce(has_data, "max").item() == 0:
            break
        if batch is None:
            task.eval_dummy(engines, dummy)
            continue
        x = normalize(batch.x.to(device), spec.mean, spec.std)
        sums += task.eval_sums(engines, x, batch.y.to(device))
    for engine in engines.values():
        engine.train(True)
    return task.eval_metrics(dist.all_reduce(sums))


def fixed_inputs(spec: DataSpec, cfg: Config, device: str, count: int = 8) -> torch.Tensor:
    """The first `count` val images (the same on every rank and at every eval), normalised."""
    # Starting a DataLoader draws a seed from the global RNG; a resumed run restores that RNG before
    # it gets here, so drawing from it would shift every later random number against the unbroken run.
    with torch.random.fork_rng(devices=[]):
        batch = next(eval_batches(spec, cfg.data, rank=0, world_size=1))
    return normalize(batch.x[:count].to(device), spec.mean, spec.std)


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


@torch.no_grad()
def digit_score(
    generator: Any,
    latent_dim: int,
    classifier: Classifier,
    spec: DataSpec,
    samples: int,
    device: str,
    seed: int,
) -> float:
    """The Inception Score of generated images under a digit classifier: exp(E_x KL(p(y|x) || p(y))).
    1 for samples the classifier cannot tell apart, up to the number of classes (10) for confident,
    varied digits. Every rank generates its share (a collective under ZeRO-3); sums are all-reduced."""
    rank, world = dist.rank_and_world()
    mine = samples // world + (1 if rank < samples % world else 0)
    rng = torch.Generator().manual_seed(seed + rank)  # leaves the training RNG alone
    z = torch.randn(max(mine, 1), latent_dim, generator=rng).to(device)
    generator.train(False)
    images = generator(z).float()
    generator.train(True)
    probs = classifier.probabilities(images, spec)[:mine]
    plogp = (probs * probs.clamp_min(1e-12).log()).sum()
    sums = torch.cat([plogp.view(1), probs.sum(dim=0), torch.tensor([float(mine)], device=probs.device)])
    sums = dist.all_reduce(sums.to(device))
    count = sums[-1].item()
    marginal = sums[1:-1] / count
    mean_kl = sums[0].item() / count - float((marginal * marginal.clamp_min(1e-12).log()).sum())
    return math.exp(mean_kl)
