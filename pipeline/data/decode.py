"""Encoded WebDataset sample -> (input, label): which members are input and target (data.fields, the
MANIFEST's detected fields, the conventions), the user's decode function (data.decode), shaping and
normalisation. Pure: no I/O beyond the bytes it is given (stream.py reads the shards)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import AugmentConfig, FieldsConfig
from pipeline.data.cache import DECODED
from pipeline.data.shards import DataError, DataSpec
from pipeline.data.transforms import (
    INPUT_KEYS,
    JSON_TARGET,
    TARGET_KEYS,
    Crop,
    conform,
    crop_image,
    decode_input,
    decode_target,
    draw_crop,
    find_input_key,
    find_target_key,
    is_image_array,
    member_of,
    members,
    to_tensor,
)


@dataclass
class Decoder:
    """Encoded sample -> (x, y); raises ValueError naming shard and key.

    Which members are input and target: `fields` (data.fields), else what the MANIFEST detected
    (`spec.fields`), else the conventions per sample (png/jpg/jpeg/webp/npy; cls/label/target, json.label).
    `decode_path` (data.decode) replaces all that by the user's function. Picklable for DataLoader
    processes: the function is imported by its path in each process, on first use."""

    spec: DataSpec
    augment_cfg: AugmentConfig | None
    seed: int
    fields: FieldsConfig | None = None
    decode_path: str | None = None

    def __post_init__(self) -> None:
        self._function: Any = None
        self._class_of: dict[str, int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_function"] = None  # a module imported from a file is not importable by name elsewhere
        return state

    def __call__(self, sample: dict, epoch: int) -> tuple[torch.Tensor, int]:
        """Decode (once: the result stays in the sample for `DecodedCache`), then augment."""
        value, label, crop = self.prepare(sample, epoch)
        if self.spec.kind in ("sequence", "tokens"):
            return value, label
        if crop is None:
            return to_tensor(value), label
        return crop_image(value, crop), label

    def prepare(self, sample: dict, epoch: int) -> tuple[Any, int, Crop | None]:
        """(decoded value, label, its augmentation or None), the pixels not moved yet: the stream's
        collate writes them, cropped and flipped, straight into the batch (one copy per sample)."""
        decoded = sample.get(DECODED)
        if decoded is None:
            try:
                decoded = self.decode(sample)
            except ValueError as e:
                decoded = str(e)  # kept too: a cached bad sample must fail again in every epoch
            for name in [k for k in sample if not k.startswith("__")]:
                del sample[name]  # the encoded bytes: a cached shard holds decoded values only
            sample[DECODED] = decoded
        if isinstance(decoded, str):
            raise ValueError(decoded)
        value, label = decoded
        augmented = self.augment_cfg is not None and self.augment_cfg.enabled
        if self.spec.kind in ("sequence", "tokens") or not augmented:
            return value, label, None
        # Seeded per (seed, epoch, key): the same sample gets the same crop after a resume.
        rng = random.Random(f"{self.seed}/{epoch}/{sample.get('__key__')}")
        return value, label, draw_crop(self.augment_cfg, rng)

    def decode(self, sample: dict) -> tuple[Any, int]:
        """The deterministic part: encoded bytes -> (uint8 pixels (H, W[, C]) or a float tensor,
        label). Any failure, the user's decode function's included, is a ValueError naming the
        sample's shard and key."""
        try:
            value, target = self.raw(sample)
            return self.finish(value, target)
        except ValueError as e:
            raise ValueError(f"sample '{sample.get('__key__')}' in shard {sample.get('__url__')}: {e}") from e

    # --- the parts, shared with `pipeline data index` ----------------------------------------------

    def key_of(self, role: str) -> tuple[str | None, str]:
        """(configured key or None, where it comes from) for role 'input' | 'target'."""
        configured = getattr(self.fields, role) if self.fields is not None else None
        if configured:
            return configured, f"data.fields.{role}"
        if self.spec.fields.get(role):
            return self.spec.fields[role], f"fields.{role} of the MANIFEST"
        return None, "detected"

    def function(self) -> Any:
        if self._function is None:
            from pipeline import imports  # users' code: imported only when data.decode names it

            self._function = imports.load_object(self.decode_path, key="data.decode")
            if not callable(self._function):
                raise DataError(f"config key 'data.decode': '{self.decode_path}' is not a function")
        return self._function

    def raw(self, sample: dict, need_input: bool = True) -> tuple[Any, int | str | None]:
        """(input array or tensor, target int | class name | None) before shaping and normalising;
        the input is None when not `need_input` (with data.fields: only the target is read)."""
        if self.decode_path:
            return self._call_user(sample)
        value = None
        if need_input:
            key, where = self.key_of("input")
            key = key or find_input_key(sample)
            if key is None or key not in sample:
                expected = key or "|".join(INPUT_KEYS)
                raise ValueError(
                    f"no input '{expected}' ({where}); the sample has: {', '.join(members(sample))}"
                )
            value = decode_input(sample[key], key)
        return value, self._target(sample)

    def _target(self, sample: dict) -> int | str | None:
        key, where = self.key_of("target")
        if key is None and self.spec.label_type is None:
            return None  # an unlabeled dataset (indexed without a target)
        key = key or find_target_key(sample)
        member, path = member_of(sample, key) if key else (None, [])
        if member is None or member not in sample:
            expected = key or "|".join((*TARGET_KEYS, JSON_TARGET))
            raise ValueError(f"no label '{expected}' ({where}); the sample has: {', '.join(members(sample))}")
        return decode_target(sample[member], path)

    def _call_user(self, sample: dict) -> tuple[Any, int | str]:
        function = self.function()
        try:
            out = function({k: v for k, v in sample.items() if k != DECODED})
        except Exception as e:  # the user's code may raise anything: one bad sample, named
            raise ValueError(f"data.decode {self.decode_path} raised {type(e).__name__}: {e}") from e
        if not isinstance(out, tuple | list) or len(out) != 2:
            raise ValueError(
                f"data.decode {self.decode_path} returned {type(out).__name__}, expected (input, target)"
            )
        value, target = out
        if isinstance(target, torch.Tensor | np.ndarray | np.generic) and np.size(target) == 1:
            target = target.item()  # a 0-d tensor or numpy scalar
        if isinstance(target, bool) or not isinstance(target, int | str):
            raise ValueError(
                f"data.decode {self.decode_path} returned the target {target!r}, expected an int (or a "
                "class name)"
            )
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            if value.dtype == torch.uint8:
                value = value.numpy()
        elif not isinstance(value, np.ndarray):
            raise ValueError(
                f"data.decode {self.decode_path} returned an input of type {type(value).__name__}, "
                "expected a numpy array or a torch tensor"
            )
        return value, target

    def label(self, target: int | str | None) -> int:
        if target is None:
            return -1  # no labels: tasks that use none (autoencoder, gan ...) ignore it
        if isinstance(target, str):
            if self.spec.label_type != "name":
                raise ValueError(f"label is not an integer: {target[:20]!r}")
            if self._class_of is None:
                self._class_of = {name: i for i, name in enumerate(self.spec.classes)}
            if target not in self._class_of:
                known = len(self._class_of)
                raise ValueError(f"label '{target}' is not one of the MANIFEST's {known} classes")
            return self._class_of[target]
        if self.spec.num_classes and not 0 <= target < self.spec.num_classes:
            raise ValueError(f"label {target} is outside 0..{self.spec.num_classes - 1} (num_classes)")
        return target

    def finish(self, value: Any, target: int | str | None) -> tuple[Any, int]:
        """Shape (images: channels and size as the MANIFEST says) and normalise (npy arrays)."""
        label = self.label(target)
        if self.spec.kind == "tokens":
            return token_window(value, self.spec), label
        if self.spec.kind == "image":
            if isinstance(value, torch.Tensor) or not is_image_array(value):
                raise ValueError(
                    f"input is {_describe(value)}, not uint8 pixels (H, W[, C]) as the MANIFEST's image "
                    "input; re-run `pipeline data index` with the run's data.fields / data.decode"
                )
            if value.ndim == 3 and value.shape[2] == 1:
                value = value[:, :, 0]
            if not value.flags.writeable:  # np.frombuffer in a decode function: torch wants its own copy
                value = value.copy()
            return conform(value, self.spec.sample_shape[0], self.spec.image_size), label
        if self.decode_path:  # the user's function returns the model's input: used as it is
            if isinstance(value, torch.Tensor):
                return value.float(), label
            return torch.from_numpy(np.array(value, dtype=np.float32)), label
        values = torch.from_numpy(np.asarray(value).astype("float32"))
        return (values - self.spec.mean[0]) / self.spec.std[0], label


def token_window(value: Any, spec: DataSpec) -> torch.Tensor:
    """A window of token shards as int64 (N + 1 tokens: the input and its next-token targets), checked
    against the MANIFEST: shards may come from anyone, and an id outside the vocabulary would index
    past the model's embedding."""
    if isinstance(value, torch.Tensor):
        value = value.numpy()
    if value.dtype.kind not in "ui" or value.ndim != 1 or list(value.shape) != list(spec.sample_shape):
        raise ValueError(
            f"input is {_describe(value)}, not a window of {spec.sample_shape[0]} integer tokens as the "
            "MANIFEST says; prepare the text again with `pipeline data prepare text:PATH`"
        )
    tokens = value.astype(np.int64)
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= spec.num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"token {bad} is outside the vocabulary 0..{spec.num_classes - 1}")
    return torch.from_numpy(tokens)


def _describe(value: Any) -> str:
    dtype = getattr(value, "dtype", type(value).__name__)
    return f"{dtype} {tuple(getattr(value, 'shape', ()))}"


def decoded_shape(value: Any, kind: str) -> list[int]:
    """The shape the model sees of one decoded input: (C, H, W) for pixels, else the array's."""
    if kind == "image":
        return [1, *value.shape] if value.ndim == 2 else [value.shape[2], value.shape[0], value.shape[1]]
    return list(value.shape)
