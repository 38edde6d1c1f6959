"""Pure sample -> tensor functions (no state, no I/O beyond the bytes they are given)."""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import torch
from PIL import Image


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, C) -> PNG bytes (lossless, so a prepared dataset keeps the real pixels)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 array (H, W) or (H, W, C). Raises ValueError on garbage."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.array(im)  # a writable copy (torch.from_numpy warns on read-only arrays)
    except Exception as e:  # Pillow raises several unrelated types for bad bytes
        raise ValueError(f"undecodable image bytes ({len(data)} bytes): {e}") from e


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W[, C]) -> uint8 (H, W, C) without a copy. Batches cross process boundaries as uint8
    HWC (4x less than float32, no transposing copy per sample); `normalize` makes them float NCHW on
    the training device."""
    array = image[:, :, None] if image.ndim == 2 else image
    return torch.from_numpy(np.ascontiguousarray(array))


def normalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """A uint8 image batch (N, H, W, C) -> float32 (N, C, H, W) in channels-last memory, scaled to
    [0, 1] and normalised per channel. Other inputs (sequences, already float) pass through."""
    if x.dtype != torch.uint8:
        return x
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    n, h, w, c = x.shape
    if c == 1:
        # One channel: NCHW and channels-last are the same bytes, but the permuted view gives the
        # channel dimension stride 1, which oneDNN's conv backward mishandles on some CPUs (heap
        # corruption, "corrupted double-linked list", seen with ResNet-18 on an AVX2-only AMD EPYC):
        # a reshape gives the plain NCHW strides.
        return (x.reshape(n, 1, h, w).float().div_(255.0) - mean_t) / std_t
    return (x.permute(0, 3, 1, 2).float().div_(255.0) - mean_t) / std_t


def decode_label(data: bytes) -> int:
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"label is not an integer: {data[:20]!r}") from e


def augment(image: np.ndarray, cfg: Any, rng: random.Random) -> np.ndarray:
    """Random crop after zero padding, and horizontal flip; `rng` is seeded per sample by the caller.
    One output allocation and one copy (no padded intermediate)."""
    pad = cfg.crop_padding
    if cfg.hflip and rng.random() < 0.5:
        image = image[:, ::-1]  # a view: the copy below does the flip
    if pad <= 0:
        return np.ascontiguousarray(image)
    height, width = image.shape[:2]
    dy, dx = rng.randint(-pad, pad), rng.randint(-pad, pad)  # crop offset relative to the image
    out = np.zeros_like(image)
    src_y, dst_y = slice(max(dy, 0), height + min(dy, 0)), slice(max(-dy, 0), height + min(-dy, 0))
    src_x, dst_x = slice(max(dx, 0), width + min(dx, 0)), slice(max(-dx, 0), width + min(-dx, 0))
    out[dst_y, dst_x] = image[src_y, src_x]
    return out


def conform(image: np.ndarray, channels: int, size: list[int] | None) -> np.ndarray:
    """Make an image (H, W[, C]) have `channels` channels and, if given, size (H, W) (bilinear)."""
    if size is not None and tuple(image.shape[:2]) != tuple(size):
        mode_image = Image.fromarray(image)
        image = np.array(mode_image.resize((size[1], size[0]), Image.BILINEAR))
    if channels == 1 and image.ndim == 3:
        image = np.array(Image.fromarray(image[:, :, :3]).convert("L"))
    elif channels == 3 and image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif channels == 3 and image.shape[2] == 4:  # RGBA -> RGB
        image = image[:, :, :3]
    return image


def decode_array(data: bytes) -> np.ndarray:
    """`.npy` bytes -> array. Raises ValueError on garbage (never unpickles)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise ValueError(f"undecodable .npy bytes ({len(data)} bytes): {e}") from e
