"""Tensor helpers shared by models and tasks (the bottom layer: they may not import each other)."""

from __future__ import annotations

import torch


def as_sequence(x: torch.Tensor) -> torch.Tensor:
    """(N, T, F) view of a batch, as recurrent models read it and next-step prediction targets it:
    (N, C, H, W) images -> (N, H, C*W) by rows, top to bottom; (N, T, F) unchanged; (N, T) -> (N, T, 1)."""
    if x.ndim == 4:
        n, c, h, w = x.shape
        return x.permute(0, 2, 1, 3).reshape(n, h, c * w)
    if x.ndim == 3:
        return x
    if x.ndim == 2:
        return x.unsqueeze(-1)
    raise ValueError(f"expected a (N, C, H, W), (N, T, F) or (N, T) batch, got shape {tuple(x.shape)}")
