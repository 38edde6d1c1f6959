"""GAN training with two engines: the discriminator D and the generator G, each with its own optimizer,
LR schedule and ZeRO state, checkpointed together.

One step: D learns real -> 1, G(z) -> 0; then G learns to make D say 1 (the non-saturating loss,
-log D(G(z))), through the updated D. Labels are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.tasks.base import Model, Step, Task


def latent_dim_of(generator: Any) -> int:
    return int(getattr(generator, "module", generator).latent_dim)


class GanTask(Task):
    EVAL_SUMS = 3
    ENGINES = ("generator", "discriminator")
    best_metric = "eval/digit_score"
    best_mode = "max"
    needs_labels = False

    def __init__(self, grid_size: int = 64, real_label: float = 1.0) -> None:
        if grid_size < 1 or not 0 < real_label <= 1:
            raise ValueError("grid_size must be >= 1 and real_label in (0, 1]")
        self.grid_size = grid_size
        self.real_label = real_label  # < 1: one-sided label smoothing, which steadies D

    def normalization(self, mean: list[float], std: list[float]) -> tuple[list[float], list[float]]:
        # Pixels in [0, 1] become [-1, 1]: the range of the generator's tanh output, so real and fake
        # images live in the same space (with the data's mean/std, bright pixels would lie out of G's reach).
        return [0.5] * len(mean), [0.5] * len(std)

    def split(self, model: nn.Module) -> dict[str, nn.Module]:
        return {"generator": model.generator, "discriminator": model.discriminator}

    def train_step(self, step: Step) -> dict[str, torch.Tensor]:
        g, d, x = step.models["generator"], step.models["discriminator"], step.x
        z = torch.randn(len(x), latent_dim_of(g), device=x.device)
        fake = g(z)
        real_target = torch.full((len(x),), self.real_label, device=x.device)
        d_loss = F.binary_cross_entropy_with_logits(
            d(x).float(), real_target
        ) + F.binary_cross_entropy_with_logits(d(fake.detach()).float(), torch.zeros_like(real_target))
        losses = {"loss": d_loss.detach(), "d_loss": d_loss.detach()}
        if not step.update("discriminator", d_loss):
            return losses
        # D's parameters are frozen for G's update: its engine must neither compute nor reduce their
        # gradients (under ZeRO-2 a second reduction in one step fails: "has already been reduced").
        # G's loss goes through D's plain module, not D's engine: the engine hooks its outputs and
        # takes a backward reaching them for a backward of its own (ZeRO-0 refuses it outright).
        # ZeRO-3 still gathers D's parameters: its hooks sit on the submodules. fp32 input: outside
        # D's engine there is no autocast, and D's weights are fp32 masters.
        d_module = d.module
        trainable = [p for p in d_module.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        try:
            g_loss = F.binary_cross_entropy_with_logits(
                d_module(fake.float()).float(), torch.ones_like(real_target)
            )
            losses |= {"loss": d_loss.detach() + g_loss.detach(), "g_loss": g_loss.detach()}
            step.update("generator", g_loss)
        finally:
            for p in trainable:
                p.requires_grad_(True)
        return losses

    @torch.no_grad()
    def eval_sums(self, models: Mapping[str, Model], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[D's loss on real val images (sum), real images D calls real, samples]."""
        logits = models["discriminator"](x).float()
        return torch.stack(
            [
                F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="sum"),
                (logits > 0).sum().float(),
                torch.tensor(float(len(x)), device=x.device),
            ]
        )

    def eval_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        loss, real, count = sums.tolist()
        n = max(count, 1.0)
        return {"eval/d_real_loss": loss / n, "eval/d_real_accuracy": real / n, "eval/samples": int(count)}

    def eval_dummy(self, models: Mapping[str, Model], x: torch.Tensor) -> None:
        with torch.no_grad():
            models["discriminator"](x)
            models["generator"](torch.zeros(1, latent_dim_of(models["generator"]), device=x.device))

    @torch.no_grad()
    def grid(self, models: Mapping[str, Model], fixed_x: torch.Tensor) -> torch.Tensor:
        """Samples from the same fixed noise at every eval step. A generator of its own: the fixed
        noise never draws from (and so never shifts) the global RNG, which a resumed run must continue
        exactly."""
        return self.sample_images(models, self.grid_size, torch.Generator().manual_seed(1234)).to(
            fixed_x.device
        )

    @torch.no_grad()
    def sample_images(self, models: Mapping[str, Model], count: int, rng: torch.Generator) -> torch.Tensor:
        g = models["generator"]
        device = next(g.module.parameters()).device
        z = torch.randn(max(count, 1), latent_dim_of(g), generator=rng).to(device)
        return g(z).float()[:count]
