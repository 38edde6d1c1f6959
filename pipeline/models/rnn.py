"""Recurrent nets (LSTM or GRU) over sequences, with a dropout + linear head.

Inputs are read as (N, T, F) sequences:
- an image batch (N, C, H, W) is H time steps of C*W features (row by row, top to bottom);
- a (N, T, F) batch is used as is;
- a (N, T) batch is a univariate series, read as (N, T, 1).
`input_shape` (from the data) is (C, H, W), (T, F) or (T,) and fixes the feature size F; T may vary.

With `embedding_dim` > 0 the net reads tokens instead: a (N, T) batch of integer ids in
0..num_classes-1 (the vocabulary of `pipeline data prepare text:` shards) goes through an embedding
(and dropout) into the recurrent layers, and output="sequence" gives (N, T, num_classes) next-token
logits; `tie_weights` shares the embedding matrix with the output layer (it needs embedding_dim equal
to hidden_size x directions). Language models are stateless across windows: every window starts from
a zero state; `forward(x, state=S, return_state=True)` carries the state on (generation).

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
    CHECKPOINT_BLOCKS = ("rnn",)  # `model.activation_checkpointing: true`: the stacked recurrent layers

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
        embedding_dim: int = 0,
        tie_weights: bool = False,
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
        directions = 2 if bidirectional else 1
        if embedding_dim < 0:
            raise ValueError(f"embedding_dim must be >= 0 (0: no embedding), got {embedding_dim}")
        if embedding_dim and num_classes < 2:
            raise ValueError(
                f"a token model needs the vocabulary size as num_classes (>= 2), got {num_classes}"
            )
        if tie_weights and embedding_dim != directions * hidden_size:
            raise ValueError(
                f"tie_weights shares the embedding with the output layer: embedding_dim ({embedding_dim}) "
                f"must equal hidden_size x directions ({directions * hidden_size})"
            )
        features = embedding_dim or feature_size(input_shape)
        self.embedding = nn.Embedding(num_classes, embedding_dim) if embedding_dim else None
        self.embedding_dropout = nn.Dropout(dropout)
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
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(directions * hidden_size, out_features))
        if tie_weights:
            self.head[1].weight = self.embedding.weight

    def forward(
        self,
        x: torch.Tensor,
        state: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
        return_state: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, ...]]:
        if self.embedding is not None:
            # token ids; a float batch (a dummy forward of zeros) is read as ids too
            inputs = self.embedding_dropout(self.embedding(x.long()))
        else:
            inputs = as_sequence(x)
        steps, state = self.rnn(inputs, state)  # (N, T, directions * hidden_size)
        if self.output == "sequence":
            out = self.head(steps)
            return (out, state) if return_state else out
        if self.bidirectional:
            forward_last = steps[:, -1, : self.hidden_size]
            backward_first = steps[:, 0, self.hidden_size :]
            out = self.head(torch.cat([forward_last, backward_first], dim=-1))
        else:
            out = self.head(steps[:, -1])
        return (out, state) if return_state else out


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
        embedding_dim: int = 0,
        tie_weights: bool = False,
    ) -> None:
        super().__init__(
            input_shape,
            num_classes,
            "lstm",
            hidden_size,
            num_layers,
            bidirectional,
            dropout,
            output,
            embedding_dim,
            tie_weights,
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
        embedding_dim: int = 0,
        tie_weights: bool = False,
    ) -> None:
        super().__init__(
            input_shape,
            num_classes,
            "gru",
            hidden_size,
            num_layers,
            bidirectional,
            dropout,
            output,
            embedding_dim,
            tie_weights,
        )
