"""Pure nn.Module models and the registry that builds them from `model.name` + `model.args`.

Every model takes `input_shape` ((C, H, W) images; (T, F) or (T,) series for the recurrent nets) and
`num_classes` from the data (the MANIFEST), so one recipe runs on 8x8 digits and 28x28 MNIST alike;
the user sets the rest through `model.args`. Models that do not classify (dcgan, autoencoder, vae)
accept `num_classes` and ignore it.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from torch import nn

from pipeline.config import ConfigError
from pipeline.models.autoencoder import ConvAutoencoder, ConvVAE
from pipeline.models.cnn import SmallCNN
from pipeline.models.gan import DCGAN
from pipeline.models.layers import ACTIVATIONS
from pipeline.models.mlp import MLP
from pipeline.models.resnet import ResNet18, ResNet34, ResNet50
from pipeline.models.rnn import GRUNet, LSTMNet

REGISTRY: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "cnn": SmallCNN,
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "lstm": LSTMNet,
    "gru": GRUNet,
    "dcgan": DCGAN,
    "autoencoder": ConvAutoencoder,
    "vae": ConvVAE,
}

_FROM_DATA = ("input_shape", "num_classes")


def check_args(name: str, args: dict[str, Any]) -> None:
    """Validate `model.name` and `model.args` against the constructor, naming the key on error."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"config key 'model.name': unknown model '{name}'{hint} (known: {', '.join(REGISTRY)})"
        )
    params = inspect.signature(REGISTRY[name].__init__).parameters
    allowed = [p for p in params if p not in ("self", *_FROM_DATA)]
    for key, value in args.items():
        if key in _FROM_DATA:
            raise ConfigError(f"config key 'model.args.{key}' is taken from the data; remove it")
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean 'model.args.{close[0]}'?" if close else f"; valid: {', '.join(allowed)}"
            raise ConfigError(f"unknown config key 'model.args.{key}' for model '{name}'{hint}")
        # "activation" and per-part ones such as dcgan's "g_activation" / "d_activation"
        if (key == "activation" or key.endswith("_activation")) and value not in ACTIVATIONS:
            raise ConfigError(
                f"config key 'model.args.{key}': '{value}' is not one of {', '.join(ACTIVATIONS)}"
            )


def build(
    name: str, args: dict[str, Any], input_shape: list[int] | tuple[int, ...], num_classes: int
) -> nn.Module:
    check_args(name, args)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    try:
        return REGISTRY[name](input_shape=tuple(input_shape), num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key 'model.args': cannot build '{name}' with {args}: {e}") from e


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen
