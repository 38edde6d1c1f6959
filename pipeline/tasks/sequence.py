"""Next-step prediction on sequences: from x[:, :t+1] predict x[:, t+1] (mean squared error).

An image batch (N, C, H, W) is a sequence of H rows of C*W values (the model reads it the same way), so
MNIST works as a real sequence data set; a (N, T, F) or (N, T) batch is a series. The model must give
a prediction per time step (`model.args.output: sequence` for lstm/gru). Labels are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pipeline.tasks.base import Model, Step, Task
from pipeline.tensors import as_sequence


class NextStepTask(Task):
    EVAL_SUMS = 3
    best_metric = "eval/next_step_mse"
    best_mode = "min"
    needs_labels = False

    @staticmethod
    def _errors(model: Any, x: torch.Tensor) -> torch.Tensor:
        predicted = model(x).float()  # (N, T, F): a prediction of step t+1 at every step t
        target = as_sequence(x).float()
        if predicted.shape != target.shape:
            raise ValueError(
                f"next_step needs a prediction per time step shaped like the input {tuple(target.shape)}, "
                f"got {tuple(predicted.shape)}; set model.args.output=sequence"
            )
        return (predicted[:, :-1] - target[:, 1:]) ** 2

    def train_step(self, step: Step) -> dict[str, torch.Tensor]:
        loss = self._errors(step.models["model"], step.x).mean()
        step.update("model", loss)
        return {"loss": loss.detach()}

    @torch.no_grad()
    def eval_sums(self, models: Mapping[str, Model], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        errors = self._errors(models["model"], x)
        return torch.stack(
            [
                errors.sum(),
                torch.tensor(float(errors.numel()), device=x.device),
                torch.tensor(float(len(x)), device=x.device),
            ]
        )

    def eval_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        sq, values, count = sums.tolist()
        return {"eval/next_step_mse": sq / max(values, 1.0), "eval/samples": int(count)}
