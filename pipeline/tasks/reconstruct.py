"""Autoencoders: plain and denoising (mean squared reconstruction error), and the VAE (ELBO with a
linear KL warmup). Reconstructions are compared in the data's normalised space; labels are ignored."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from pipeline.tasks.base import Model, Step, Task


class AutoencoderTask(Task):
    EVAL_SUMS = 3
    best_metric = "eval/recon_mse"
    best_mode = "min"
    needs_labels = False

    def __init__(self, noise_std: float = 0.0) -> None:
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.noise_std = noise_std  # > 0: a denoising autoencoder (corrupt the input, reconstruct it clean)

    def _corrupt(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.noise_std * torch.randn_like(x) if self.noise_std else x

    def train_step(self, step: Step) -> dict[str, torch.Tensor]:
        loss = F.mse_loss(step.models["model"](self._corrupt(step.x)).float(), step.x.float())
        step.update("model", loss)
        return {"loss": loss.detach()}

    @torch.no_grad()
    def eval_sums(self, models: Mapping[str, Model], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[sum of squared errors, values, samples]: the val reconstruction of clean inputs."""
        x_hat = models["model"](x).float()
        return torch.stack(
            [((x_hat - x.float()) ** 2).sum(), torch.tensor(float(x.numel())), torch.tensor(float(len(x)))]
        ).to(x.device)

    def eval_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        sq, values, count = sums.tolist()[:3]
        return {"eval/recon_mse": sq / max(values, 1.0), "eval/samples": int(count)}

    @torch.no_grad()
    def grid(self, models: Mapping[str, Model], fixed_x: torch.Tensor) -> torch.Tensor:
        """The fixed val inputs above their reconstructions."""
        out = models["model"](fixed_x)
        out = out[0] if isinstance(out, tuple) else out
        return torch.cat([fixed_x, out.float()])


class VaeTask(AutoencoderTask):
    """Loss per sample = sum of squared errors (a Gaussian decoder of unit variance, up to constants)
    + beta * KL(q(z|x) || N(0, I)), beta rising linearly from 0 over `kl_warmup_steps` (avoids the
    posterior collapsing before the decoder has learnt anything)."""

    EVAL_SUMS = 4

    def __init__(self, kl_warmup_steps: int = 0, beta: float = 1.0) -> None:
        super().__init__(0.0)
        if kl_warmup_steps < 0 or beta < 0:
            raise ValueError("kl_warmup_steps and beta must be >= 0")
        self.kl_warmup_steps = kl_warmup_steps
        self.beta = beta

    def kl_weight(self, step: int) -> float:
        return self.beta * min(1.0, step / self.kl_warmup_steps) if self.kl_warmup_steps else self.beta

    @staticmethod
    def _kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Per-sample KL(N(mu, exp(logvar)) || N(0, I))."""
        return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)

    def train_step(self, step: Step) -> dict[str, torch.Tensor]:
        x_hat, mu, logvar = step.models["model"](step.x)
        recon = ((x_hat.float() - step.x.float()) ** 2).flatten(1).sum(dim=1).mean()
        kl = self._kl(mu.float(), logvar.float()).mean()
        loss = recon + self.kl_weight(step.number) * kl
        step.update("model", loss)
        return {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def eval_sums(self, models: Mapping[str, Model], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[sum of squared errors, values, samples, sum of KL]. In eval mode the VAE decodes z = mu, so
        the val error is deterministic."""
        x_hat, mu, logvar = models["model"](x)
        return torch.stack(
            [
                ((x_hat.float() - x.float()) ** 2).sum(),
                torch.tensor(float(x.numel()), device=x.device),
                torch.tensor(float(len(x)), device=x.device),
                self._kl(mu.float(), logvar.float()).sum(),
            ]
        )

    def eval_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        sq, values, count, kl = sums.tolist()
        return {
            "eval/recon_mse": sq / max(values, 1.0),
            "eval/kl": kl / max(count, 1.0),
            "eval/samples": int(count),
        }
