"""Plain nn.Modules; the pipeline passes `input_shape` and `num_classes` because the constructors
name them."""

from __future__ import annotations

import math

from torch import nn


class TinyNet(nn.Module):
    """An MLP over flattened inputs."""

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 32, dropout: float = 0.0
    ):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.net(x)


class TeacherStudent(nn.Module):
    """Two classifiers trained together (online distillation): each becomes its own engine."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, teacher_hidden: int = 64):
        super().__init__()
        self.teacher = TinyNet(input_shape, num_classes, hidden=teacher_hidden)
        self.student = TinyNet(input_shape, num_classes, hidden=max(4, teacher_hidden // 4))

    def forward(self, x):
        return self.student(x)


class NotAModel:
    """For the error tests: not an nn.Module."""


class Exploding(nn.Module):
    """For the error tests: a constructor that raises."""

    def __init__(self, input_shape, num_classes, size: int = 1):
        super().__init__()
        raise RuntimeError(f"cannot build with size={size}")
