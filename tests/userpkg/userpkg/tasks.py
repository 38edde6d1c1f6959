"""Tasks against the public protocol (`pipeline.Task`): see pipeline/tasks/base.py for the contract."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import pipeline


class SmoothClassify(pipeline.Task):
    """Cross-entropy with label smoothing and mixup; eval reports accuracy, NLL and the mean
    confidence of the predicted class (a custom metric)."""

    EVAL_SUMS = 4

    def __init__(self, label_smoothing: float = 0.1, mixup_alpha: float = 0.0) -> None:
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing, self.mixup_alpha = label_smoothing, mixup_alpha

    def train_step(self, step: pipeline.Step) -> dict[str, torch.Tensor]:
        x, y = step.x, step.y
        if self.mixup_alpha > 0:  # torch's global RNG: restored exactly on resume
            lam = float(torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample())
            perm = torch.randperm(len(x), device=x.device)
            logits = step.models["model"](lam * x + (1 - lam) * x[perm]).float()
            loss = lam * self._ce(logits, y) + (1 - lam) * self._ce(logits, y[perm])
        else:
            logits = step.models["model"](x).float()
            loss = self._ce(logits, y)
        step.update("model", loss)
        accuracy = (logits.argmax(dim=1) == y).float().mean()
        return {"loss": loss.detach(), "accuracy": accuracy.detach()}

    def _ce(self, logits, y):
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def eval_sums(self, models, x, y):
        logits = models["model"](x).float()
        probs = logits.softmax(dim=1)
        return torch.stack(
            [
                F.cross_entropy(logits, y, reduction="sum"),
                (logits.argmax(dim=1) == y).sum().float(),
                probs.max(dim=1).values.sum(),
                torch.tensor(float(len(y)), device=x.device),
            ]
        )

    def eval_metrics(self, sums):
        nll, correct, confidence, count = sums.tolist()
        count = max(count, 1.0)
        return {
            "eval/loss": nll / count,
            "eval/accuracy": correct / count,
            "eval/confidence": confidence / count,
        }


class CoDistill(pipeline.Task):
    """Two engines: the teacher learns from the labels, the student from the labels and the teacher's
    softened predictions (detached: no gradient crosses engines)."""

    ENGINES = ("teacher", "student")
    EVAL_SUMS = 3
    best_metric = "eval/student_accuracy"

    def __init__(self, alpha: float = 0.5, temperature: float = 2.0) -> None:
        self.alpha, self.temperature = alpha, temperature

    def split(self, model):
        return {"teacher": model.teacher, "student": model.student}

    def train_step(self, step):
        teacher_logits = step.models["teacher"](step.x).float()
        teacher_loss = F.cross_entropy(teacher_logits, step.y)
        losses = {"loss": teacher_loss.detach(), "teacher_loss": teacher_loss.detach()}
        if not step.update("teacher", teacher_loss):
            return losses
        t = self.temperature
        student_logits = step.models["student"](step.x).float()
        soft = F.kl_div(
            F.log_softmax(student_logits / t, dim=1),
            F.softmax(teacher_logits.detach() / t, dim=1),
            reduction="batchmean",
        )
        student_loss = (1 - self.alpha) * F.cross_entropy(student_logits, step.y) + self.alpha * t * t * soft
        step.update("student", student_loss)
        return losses | {"student_loss": student_loss.detach()}

    @torch.no_grad()
    def eval_sums(self, models, x, y):
        correct = [(models[name](x).argmax(dim=1) == y).sum().float() for name in self.ENGINES]
        return torch.stack([*correct, torch.tensor(float(len(y)), device=x.device)])

    def eval_metrics(self, sums):
        teacher, student, count = sums.tolist()
        count = max(count, 1.0)
        return {"eval/teacher_accuracy": teacher / count, "eval/student_accuracy": student / count}


class Unequal(SmoothClassify):
    """For the error tests: updates twice on rank 1 only, which the agreement must catch."""

    def train_step(self, step):
        losses = super().train_step(step)
        if torch.distributed.get_rank() == 1:
            step.update("model", losses["loss"].clone().requires_grad_())
        return losses


class NoEval(pipeline.Task):
    """For the error tests: no eval_sums/eval_metrics."""

    def train_step(self, step):
        return {}
