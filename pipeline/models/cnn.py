"""A small CNN: stages of (conv3x3 -> BatchNorm -> activation) x2 -> max-pool, then a linear head.

Global average pooling before the head makes it independent of the input size (8x8 digits, 28x28
MNIST and larger images alike); a stage is skipped once the feature map is 1 pixel wide.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.layers import make_activation


def _conv_block(c_in: int, c_out: int, act: str) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), make_activation(act)]


class SmallCNN(nn.Module):
    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        channels: tuple[int, ...] = (32, 64),
        activation: str = "relu",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        in_channels, height, width = input_shape
        layers: list[nn.Module] = []
        c_in, side = in_channels, min(height, width)
        for c_out in channels:
            layers += _conv_block(c_in, c_out, activation) + _conv_block(c_out, c_out, activation)
            if side >= 2:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
