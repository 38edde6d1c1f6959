"""This project's own shard format: each sample is `KEY.pixels.bin` (raw uint8 pixels, row-major) and
`KEY.meta.json` (`{"height": 8, "width": 8, "digit": 3}`): no image codec, shape in the metadata."""

from __future__ import annotations

import json

import numpy as np


def decode(sample: dict[str, bytes]) -> tuple[np.ndarray, int]:
    """One WebDataset sample (key -> bytes) -> (uint8 image (H, W), label). Raising ValueError marks
    the sample bad: data.on_error=strict stops naming shard and key, skip counts it."""
    meta = json.loads(sample["meta.json"])
    pixels = np.frombuffer(sample["pixels.bin"], dtype=np.uint8)
    if pixels.size != meta["height"] * meta["width"]:
        raise ValueError(f"{pixels.size} pixels for a {meta['height']}x{meta['width']} image")
    return pixels.reshape(meta["height"], meta["width"]), int(meta["digit"])
