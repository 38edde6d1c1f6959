"""Recurrent nets (LSTM or GRU) over sequences, with a dropout + linear head.

Inputs are read as (N, T, F) sequences:
- an image batch (N, C, H, W) is H time steps of C*W features (row by row, top to bottom);
- a (N, T, F) batch is used as is;
- a (N, T) batch is a univariate series, read as (N, T, 1).
`input_shape` (from the data) is (C, H, W), (T, F) or (T,) and fixes the feature size F; T may vary.

output="last" classifies the whole sequence: (N, num_classes) logits from the last time step (for
bidirectional: the forward state after the last step concatenated with the backward state after
reading back to t=0). output="sequence" predicts at every step: (N, T, out) with out = num_classes, or
the feature size F when num_classes is 0 (next-step prediction of the series itself).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.tensors import as_sequence

CELLS: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU}
OUTPUTS = ("last", "sequence")


def feature_size(input_shape: tuple[int, ...]) -> int:
    """Features per time step for an input of `input_shape` (see the module docstring)."""
    if len(input_shape) == 3:
        channels, _height, width = input_shape
        return channels * width
    if len(input_shape) == 2:
        return input_shape[1]
    if len(input_shape) == 1:
        return 1
    raise ValueError(f"input_shape must be (C, H, W), (T, F) or (T,), got {input_shape}")


class RecurrentNet(nn.Module):
    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        cell: str = "lstm",
        hidden_size: int = 128,
        num_layers: int = 2,
        bidirectional: bool = False,
        dropout: float = 0.1,
        output: str = "last",
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, got '{cell}'")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got '{output}'")
        if output == "last" and num_classes < 1:
            raise ValueError(
                f"output='last' classifies the sequence and needs num_classes >= 1, got {num_classes}"
            )
        if output == "sequence" and num_classes == 0 and bidirectional:
            # The backward direction has already read step t+1 when predicting it: the loss would be
            # near zero and the model useless for forecasting.
            raise ValueError(
                "next-step prediction (num_classes=0) cannot be bidirectional: it sees the future"
            )
        features = feature_size(input_shape)
        self.output = output
        self.hidden_size = hidden_size
        self.bidirectional = bidirectional
        # nn.LSTM/GRU apply `dropout` only between stacked layers and warn when there is just one.
        self.rnn = CELLS[cell](
            features,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
            bidirectional=bidirectional,
        )
        out_features = num_classes if num_classes > 0 else features
        directions = 2 if bidirectional else 1
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(directions * hidden_size, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps, _ = self.rnn(as_sequence(x))  # (N, T, directions * hidden_size)
        if self.output == "sequence":
            return self.head(steps)
        if self.bidirectional:
            forward_last = steps[:, -1, : self.hidden_size]
            backward_first = steps[:, 0, self.hidden_size :]
            return self.head(torch.cat([forward_last, backward_first], dim=-1))
        return self.head(steps[:, -1])


class LSTMNet(RecurrentNet):
    """RecurrentNet with cell="lstm" (registry name "lstm")."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden_size: int = 128,
        num_layers: int = 2,
        bidirectional: bool = False,
        dropout: float = 0.1,
        output: str = "last",
    ) -> None:
        super().__init__(
            input_shape, num_classes, "lstm", hidden_size, num_layers, bidirectional, dropout, output
        )


class GRUNet(RecurrentNet):
    """RecurrentNet with cell="gru" (registry name "gru")."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden_size: int = 128,
        num_layers: int = 2,
        bidirectional: bool = False,
        dropout: float = 0.1,
        output: str = "last",
    ) -> None:
        super().__init__(
            input_shape, num_classes, "gru", hidden_size, num_layers, bidirectional, dropout, output
        )
