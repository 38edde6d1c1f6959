"""Pure nn.Module models and the registry that builds them from `model.name` + `model.args`.

Every model takes `input_shape` ((C, H, W) images; (T, F) or (T,) series for the recurrent nets) and
`num_classes` from the data (the MANIFEST), so one recipe runs on 8x8 digits and 28x28 MNIST alike;
the user sets the rest through `model.args`. Models that do not classify (dcgan, autoencoder, vae)
accept `num_classes` and ignore it.

`model.name` may also name the user's own `nn.Module` subclass by import path, `package.module:Class`
or `path/to/file.py:Class`: it gets `model.args` as keyword arguments, plus `input_shape` (a tuple) and
`num_classes` from the data (and, for an environment task, `action_space`) when its constructor names
those parameters. It is validated as the
built-in models are (unknown args with a did-you-mean; a constructor with **kwargs takes anything), and
built once on the driver, so a wrong path or a constructor that raises is a ConfigError before any
worker starts.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from torch import nn

from pipeline import imports
from pipeline.config import ConfigError
from pipeline.models.actor_critic import ActorCritic
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
    "actor_critic": ActorCritic,
}

_FROM_DATA = ("input_shape", "num_classes", "action_space")


def model_class(name: str) -> type[nn.Module]:
    """The class `model.name` names: a built-in model, or the user's nn.Module by import path."""
    if imports.is_import_path(name):
        return imports.load_class(name, key="model.name", base=nn.Module, what="torch.nn.Module")
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"config key 'model.name': unknown model '{name}'{hint} (known: {', '.join(REGISTRY)}; or your "
            "own nn.Module as 'package.module:Class' or 'path/to/file.py:Class')"
        )
    return REGISTRY[name]


def _parameters(cls: type[nn.Module]) -> tuple[list[inspect.Parameter], bool]:
    """The constructor's keyword-passable parameters (without self), and whether it takes **kwargs."""
    if cls.__init__ is nn.Module.__init__:  # no constructor of its own: nn.Module's takes no args we pass
        return [], False
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return [p for p in params if p.kind in kinds], var_kw


def check_args(name: str, args: dict[str, Any]) -> None:
    """Validate `model.name` and `model.args` against the constructor, naming the key on error."""
    cls = model_class(name)
    params, var_kw = _parameters(cls)
    named = [p.name for p in params]
    from_data = [k for k in _FROM_DATA if k in named or name in REGISTRY]
    allowed = [p for p in named if p not in from_data]
    for key, value in args.items():
        if key in from_data:
            raise ConfigError(f"config key 'model.args.{key}' is taken from the data; remove it")
        if key not in allowed and not var_kw:
            close = difflib.get_close_matches(key, allowed, n=1)
            valid = ", ".join(allowed) or "none"
            hint = f"; did you mean 'model.args.{close[0]}'?" if close else f"; valid: {valid}"
            raise ConfigError(f"unknown config key 'model.args.{key}' for model '{name}'{hint}")
        # "activation" and per-part ones such as dcgan's "g_activation" / "d_activation"
        is_activation = key == "activation" or key.endswith("_activation")
        if name in REGISTRY and is_activation and value not in ACTIVATIONS:
            raise ConfigError(
                f"config key 'model.args.{key}': '{value}' is not one of {', '.join(ACTIVATIONS)}"
            )
    required = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty and p.name not in args and p.name not in from_data
    ]
    if required:
        raise ConfigError(
            f"config key 'model.args': model '{name}' needs {', '.join(repr(r) for r in required)} "
            "(its constructor gives no default)"
        )


def build(
    name: str,
    args: dict[str, Any],
    input_shape: list[int] | tuple[int, ...],
    num_classes: int,
    action_space: dict[str, Any] | None = None,
) -> nn.Module:
    """The model `name` names, built with `args` (lists become tuples) and, where its constructor
    names them, `input_shape` and `num_classes` from the data, and `action_space` from the
    environment of an environment task (envs.spaces: discrete or box)."""
    check_args(name, args)
    cls = model_class(name)
    named = {p.name for p in _parameters(cls)[0]}
    data = {"input_shape": tuple(input_shape), "num_classes": num_classes}
    kwargs = {k: v for k, v in data.items() if k in named or name in REGISTRY}
    if "action_space" in named:
        kwargs["action_space"] = action_space
    kwargs |= {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    try:
        model = cls(**kwargs)
    except Exception as e:  # the user's code may raise anything: name the key, the class, the error
        what = "" if name in REGISTRY else f" (class {cls.__qualname__})"
        raise ConfigError(
            f"config key 'model.args': cannot build model.name '{name}'{what} with {args}: "
            f"{type(e).__name__}: {e}"
        ) from e
    if not isinstance(model, nn.Module):  # a __new__ that returns something else
        raise ConfigError(f"config key 'model.name': '{name}' did not build an nn.Module")
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen
