"""Classification: cross-entropy loss, accuracy.

`train_step` returns the loss to backpropagate and detached metric tensors; nothing here calls
`.item()`, so no host-device sync happens per step (the loop syncs when it logs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def train_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    accuracy = (logits.argmax(dim=1) == y).float().mean()
    return loss, {"loss": loss.detach(), "accuracy": accuracy.detach()}


@torch.no_grad()
def eval_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[sum of losses, correct predictions, samples] for one batch, to be summed across batches/ranks."""
    logits = model(x).float()
    loss_sum = F.cross_entropy(logits, y, reduction="sum")
    correct = (logits.argmax(dim=1) == y).sum()
    return torch.stack([loss_sum, correct.float(), torch.tensor(float(len(y)), device=logits.device)])


def eval_metrics(sums: torch.Tensor) -> dict[str, float]:
    loss_sum, correct, count = sums.tolist()
    if count == 0:
        return {"eval/loss": float("nan"), "eval/accuracy": float("nan"), "eval/samples": 0}
    return {"eval/loss": loss_sum / count, "eval/accuracy": correct / count, "eval/samples": int(count)}
