"""A plain nn.Module: nothing here knows about DeepSpeed, Ray or precision."""

from __future__ import annotations

from torch import nn


class DigitNet(nn.Module):
    """Two conv blocks (conv, BatchNorm, ReLU, 2x2 max pool) and a linear head.

    `input_shape` (C, H, W) and `num_classes` come from the data's MANIFEST because the constructor
    names them; `width` and `dropout` come from `model.args`."""

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, width: int = 16, dropout: float = 0.1
    ):
        super().__init__()
        channels, height, width_px = input_shape

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.features = nn.Sequential(block(channels, width), block(width, 2 * width))
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(2 * width * (height // 4) * (width_px // 4), num_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))
