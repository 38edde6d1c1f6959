"""A classifier trained with mixup and label smoothing, evaluated with accuracy, NLL and a custom
metric, the expected calibration error (ECE): the protocol is `pipeline.Task` (pipeline/tasks/base.py).

The loop handles everything distributed: `step.update` agrees across ranks that the loss is finite
before any weight changes (a NaN step is skipped on every rank), and eval sums are all-reduced."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import pipeline

BINS = 10  # confidence bins of the ECE


class MixupClassify(pipeline.Task):
    # [NLL sum, correct, samples] + per confidence bin [samples, confidence sum, correct]
    EVAL_SUMS = 3 + 3 * BINS
    best_metric = "eval/accuracy"
    best_mode = "max"

    def __init__(self, mixup_alpha: float = 0.2, label_smoothing: float = 0.1) -> None:
        if mixup_alpha < 0 or not 0 <= label_smoothing < 1:
            raise ValueError("mixup_alpha must be >= 0 and label_smoothing in [0, 1)")
        self.mixup_alpha, self.label_smoothing = mixup_alpha, label_smoothing

    def train_step(self, step: pipeline.Step) -> dict[str, torch.Tensor]:
        x, y = step.x, step.y
        lam = 1.0
        partner = torch.arange(len(x), device=x.device)
        if self.mixup_alpha > 0:  # torch's global RNG: a resumed run draws the same mixes
            lam = float(torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample())
            partner = torch.randperm(len(x), device=x.device)
        logits = step.models["model"](lam * x + (1 - lam) * x[partner]).float()
        loss = lam * self._ce(logits, y) + (1 - lam) * self._ce(logits, y[partner])
        step.update("model", loss)  # False: skipped on every rank (a non-finite loss somewhere)
        return {"loss": loss.detach(), "mix": torch.tensor(lam)}  # logged as train/loss, train/mix

    def _ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def eval_sums(self, models, x, y):
        logits = models["model"](x).float()
        confidence, predicted = logits.softmax(dim=1).max(dim=1)
        correct = (predicted == y).float()
        which = (confidence * BINS).long().clamp(max=BINS - 1)
        per_bin = torch.zeros(BINS, 3, device=x.device)
        per_bin.index_add_(0, which, torch.stack([torch.ones_like(confidence), confidence, correct], dim=1))
        totals = torch.stack(
            [F.cross_entropy(logits, y, reduction="sum"), correct.sum(), correct.new_tensor(len(y))]
        )
        return torch.cat([totals, per_bin.flatten()])

    def eval_metrics(self, sums):
        nll, correct, count = sums[:3].tolist()
        per_bin = sums[3:].view(BINS, 3)
        count = max(count, 1.0)
        # ECE: the sample-weighted gap between confidence and accuracy over the bins
        ece = (per_bin[:, 1] - per_bin[:, 2]).abs().sum().item() / count
        return {"eval/loss": nll / count, "eval/accuracy": correct / count, "eval/ece": ece}
