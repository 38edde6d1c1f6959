"""Classification: cross-entropy loss, accuracy and top-k accuracy. Also the sequence classifiers (an
LSTM/GRU reading an image row by row is a classifier too).

Nothing here calls `.item()`: no host-device sync per step (the loop syncs when it logs).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from pipeline.tasks.base import Model, Step, Task


class ClassifyTask(Task):
    EVAL_SUMS = 4

    def __init__(self, top_k: int = 5, label_smoothing: float = 0.0) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k = top_k
        self.label_smoothing = label_smoothing

    def train_step(self, step: Step) -> dict[str, torch.Tensor]:
        logits = step.models["model"](step.x)
        loss = F.cross_entropy(logits.float(), step.y, label_smoothing=self.label_smoothing)
        step.update("model", loss)
        return {"loss": loss.detach()}

    @torch.no_grad()
    def eval_sums(self, models: Mapping[str, Model], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[sum of losses, correct, correct in top k, samples] for one batch."""
        logits = models["model"](x).float()
        k = min(self.top_k, logits.shape[1])
        in_top_k = (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1)
        return torch.stack(
            [
                F.cross_entropy(logits, y, reduction="sum"),
                (logits.argmax(dim=1) == y).sum().float(),
                in_top_k.sum().float(),
                torch.tensor(float(len(y)), device=logits.device),
            ]
        )

    def eval_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        loss_sum, correct, correct_k, count = sums.tolist()
        if count == 0:
            return {"eval/loss": float("nan"), "eval/accuracy": float("nan"), "eval/samples": 0}
        return {
            "eval/loss": loss_sum / count,
            "eval/accuracy": correct / count,
            f"eval/top{self.top_k}_accuracy": correct_k / count,
            "eval/samples": int(count),
        }
