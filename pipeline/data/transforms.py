"""Pure sample -> tensor functions (no state, no I/O beyond the bytes they are given)."""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, C) -> PNG bytes (lossless, so a prepared dataset keeps the real pixels)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


_CONVERT = {"P": "RGB", "PA": "RGBA", "1": "L", "LA": "L", "CMYK": "RGB", "YCbCr": "RGB"}


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 array (H, W) or (H, W, C). Raises ValueError on garbage."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in _CONVERT:  # palette/bilevel/CMYK files (users' own shards): plain pixels
                im = im.convert(_CONVERT[im.mode])
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


@dataclass(frozen=True)
class Crop:
    """One sample's augmentation, drawn before any pixel moves: flip, then the crop offset."""

    flip: bool
    dy: int  # crop offset relative to the image (after zero padding), rows
    dx: int  # ... columns
    padded: bool  # crop_padding > 0: pixels shifted out are zeros


def draw_crop(cfg: Any, rng: random.Random) -> Crop:
    """The random part of `augment`; `rng` is seeded per sample by the caller. The draws (flip first,
    then dy, dx) are those of every earlier release: the same seed gives the same crop after a resume."""
    flip = bool(cfg.hflip and rng.random() < 0.5)
    pad = cfg.crop_padding
    if pad <= 0:
        return Crop(flip, 0, 0, padded=False)
    dy, dx = rng.randint(-pad, pad), rng.randint(-pad, pad)
    return Crop(flip, dy, dx, padded=True)


def apply_crop(image: np.ndarray, crop: Crop, out: torch.Tensor) -> torch.Tensor:
    """Write `image` (H, W[, C]) flipped and shifted into `out` (H, W, C), zeros where the shift leaves
    no pixels: one copy, straight into a batch slot when `out` is one."""
    source = image[:, :, None] if image.ndim == 2 else image
    target = out.numpy()
    height, width = source.shape[:2]
    src_y, dst_y = _span(crop.dy, height), _span(-crop.dy, height)
    # The crop is taken from the flipped image: its columns a..b are columns W-b..W-a of the original.
    src_x, dst_x = _span(crop.dx, width), _span(-crop.dx, width)
    if crop.flip:
        src_x = slice(width - src_x.stop, width - src_x.start)
    if crop.padded:  # only the strips the shifted image leaves uncovered
        target[: dst_y.start] = 0
        target[dst_y.stop :] = 0
        target[dst_y, : dst_x.start] = 0
        target[dst_y, dst_x.stop :] = 0
    region = source[src_y, src_x]
    if not crop.flip:
        target[dst_y, dst_x] = region
    elif torch.get_num_threads() == 1:
        # Torch's flip kernel: ~20 us for 256x256 RGB, where numpy copies reversed pixels at ~90 us (as
        # whole pixels) to ~220 us (byte by byte). Only single-threaded (loader processes are): split
        # across intra-op threads on busy cores, it waits for a descheduled thread (0.5-2 ms).
        out[dst_y, dst_x].copy_(torch.from_numpy(region).flip(1))
    else:
        pixel = np.dtype((np.void, source.shape[2] * source.itemsize))  # a whole pixel per element
        target[dst_y, dst_x].view(pixel)[...] = region.view(pixel)[:, ::-1]
    return out


def _span(shift: int, size: int) -> slice:
    """The indices 0..size-1 that stay inside after shifting by `shift` (positive: from the start)."""
    return slice(max(shift, 0), size + min(shift, 0))


def crop_image(image: np.ndarray, crop: Crop) -> torch.Tensor:
    """`apply_crop` into a new (H, W, C) tensor."""
    return apply_crop(image, crop, torch.from_numpy(np.empty(image_shape(image), image.dtype)))


def image_shape(image: np.ndarray) -> tuple[int, ...]:
    """(H, W, C) of an image array (H, W[, C]): the shape of its tensor in a batch."""
    return (*image.shape, 1) if image.ndim == 2 else tuple(image.shape)


def place(value: np.ndarray | torch.Tensor, crop: Crop | None, out: torch.Tensor) -> None:
    """Write one decoded sample into its slot `out` of a batch: cropped and flipped when it has a
    `crop`, else as it is (an image (H, W) gets its channel axis)."""
    if crop is not None:
        apply_crop(value, crop, out)
    elif isinstance(value, np.ndarray):  # numpy copies in this thread (see `apply_crop` for why)
        out.numpy()[...] = value.reshape(out.shape)
    else:
        out.copy_(value.reshape(out.shape))


def augment(image: np.ndarray, cfg: Any, rng: random.Random) -> np.ndarray:
    """Random crop after zero padding, and horizontal flip; `rng` is seeded per sample by the caller.
    One output allocation and one copy (no padded intermediate)."""
    pixels = crop_image(image, draw_crop(cfg, rng)).numpy()
    return pixels[:, :, 0] if image.ndim == 2 else pixels


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


# --- which keys of a sample are input and target (data.fields) ----------------------------------------

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
INPUT_KEYS = (*IMAGE_EXTS, "npy")  # detected in this order when data.fields.input is not set
TARGET_KEYS = ("cls", "label", "target")  # ints (ascii), detected in this order
JSON_TARGET = "json.label"  # detected when no int target key exists


def members(sample: dict[str, Any]) -> list[str]:
    """A sample's member keys (extensions), without webdataset's `__key__`/`__url__`."""
    return sorted(k for k in sample if not k.startswith("__"))


def _by_last_ext(keys: list[str], exts: tuple[str, ...]) -> str | None:
    """The one key whose last extension is in `exts` (`input.npy` for npy); None if none or several."""
    found = [k for k in keys if "." in k and k.rsplit(".", 1)[1] in exts]
    return found[0] if len(found) == 1 else None


def find_input_key(sample: dict[str, Any]) -> str | None:
    """The input's key by convention: png | jpg | jpeg | webp | npy, else the one `*.EXT` of those."""
    keys = members(sample)
    return next((k for k in INPUT_KEYS if k in sample), None) or _by_last_ext(keys, INPUT_KEYS)


def find_target_key(sample: dict[str, Any]) -> str | None:
    """The target's key by convention: cls | label | target, else the one `*.cls` (`target.cls`)
    ..., else `json.label` if the sample's .json has a "label"."""
    keys = members(sample)
    found = next((k for k in TARGET_KEYS if k in sample), None) or _by_last_ext(keys, TARGET_KEYS)
    if found is None and "json" in sample:
        try:
            if "label" in json.loads(sample["json"]):
                return JSON_TARGET
        except (ValueError, TypeError):
            pass
    return found


def member_of(sample: dict[str, Any], key: str) -> tuple[str, list[str]]:
    """(member, JSON field path) a field key names: `cls` -> ('cls', []), `json.label` -> ('json',
    ['label']) when the sample has no `json.label` member itself, `meta.json.a.b` -> ('meta.json',
    ['a', 'b'])."""
    if key in sample:
        return key, []
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head.endswith("json") and head in sample:
            return head, parts[cut:]
    # Missing: name the member the key would come from (for `json.label` that is `json`).
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head.endswith("json"):
            return head, parts[cut:]
    return key, []


def decode_target(data: bytes, path: list[str]) -> int | str:
    """A target member's bytes -> an int label, or a class name (str) to look up in the class map.
    `path`: the field inside a JSON member (e.g. ['label'])."""
    if path:
        try:
            value: Any = json.loads(data)
            for part in path:
                value = value[part]
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise ValueError(f"label: no field '{'.'.join(path)}' in the JSON {data[:60]!r}") from e
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"label: JSON field '{'.'.join(path)}' is {value!r}, not an int or a class name")
        return value
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"label is not text: {data[:20]!r}") from e
    try:
        return int(text)
    except ValueError:
        if not text:
            raise ValueError("label is empty") from None
        return text  # a class name


def is_image_array(array: np.ndarray) -> bool:
    """uint8 (H, W) or (H, W, C) with C in 1, 3, 4: pixels, decoded like a png (augment, normalise)."""
    return array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4)))


def decode_input(data: bytes, key: str) -> np.ndarray:
    """An input member's bytes -> array, by the key's last extension: an image (uint8 (H, W[, C]))
    or `.npy` (any array; a uint8 (H, W[, C]) one is an image, (H, W, 1) squeezed to (H, W))."""
    ext = key.rsplit(".", 1)[-1]
    if ext == "npy":
        array = decode_array(data)
        if is_image_array(array) and array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        return array
    if ext in IMAGE_EXTS:
        return decode_image(data)
    raise ValueError(
        f"input '{key}': unknown format '.{ext}' (png, jpg, jpeg, webp or npy; or set data.decode)"
    )
