"""Fine-tuning: load `init_from` weights into a fresh model, freeze what is asked, name LR groups.

Used twice: by the launcher's preflight (a key mismatch is a usage error, exit 2, before any worker
starts) and by every worker before its engine is built.

Weights that do not fit exactly: the model's first convolution is adapted when only its input channels
differ from the file's (RGB weights, 1-channel data; `init_from.adapt_input_channels`); every other key
must match, and the error says what to change (the model's own head to exclude, a width factor that
explains the shapes). `init_from.freeze_batchnorm` keeps the running statistics of frozen BatchNorm
layers (see `hold_batchnorm_stats`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from fnmatch import fnmatch
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from pipeline.checkpoint.weights import load_weights
from pipeline.config import ConfigError, InitFromConfig

SHOWN = 5  # keys listed per problem in an error


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch(name, p) for p in patterns)


def _listing(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def head_name(model: nn.Module) -> str | None:
    """The classifier head: the name of the model's last nn.Linear (`fc` in a ResNet), if any."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]
    return names[-1] if names else None


def first_conv_key(model: nn.Module) -> str | None:
    """The weight of the model's first convolution (registration order), the one that sees the data's
    channels; None if the model has none. Transposed and grouped convolutions do not count: their
    dimension 1 is not the input channels."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            if m.transposed or m.groups != 1:
                return None
            return f"{name}.weight" if name else "weight"
    return None


def adapt_input_channels(weight: torch.Tensor, channels: int) -> tuple[torch.Tensor, str]:
    """Convolution filters (out, in, *kernel) made to read `channels` input channels, and how.

    To 1 channel the filters are summed over their input channels: a gray image fed as identical R, G
    and B planes gave exactly that response. To other counts the filters are repeated cyclically and
    scaled by in/channels, which keeps the response to an input whose channels are all equal."""
    have = weight.shape[1]
    if channels == 1:
        return weight.sum(dim=1, keepdim=True), "summed"
    copies = -(-channels // have)  # ceil
    repeated = weight.repeat(1, copies, *([1] * (weight.ndim - 2)))[:, :channels]
    return repeated * (have / channels), f"repeated, scaled by {have}/{channels}"


def _only_channels_differ(a: torch.Size, b: torch.Size) -> bool:
    return len(a) == len(b) >= 3 and a[1] != b[1] and a[0] == b[0] and a[2:] == b[2:]


def _width_factor(shapes: dict[str, tuple[torch.Size, torch.Size]]) -> tuple[Fraction, list[str]] | None:
    """(file/model size ratio, keys it explains) when one constant ratio shows up in the mismatched
    tensors (a model built with another width); None unless it explains tensors of two
    layers or more."""
    ratios: dict[str, set[Fraction]] = {}
    for key, (theirs, ours) in shapes.items():
        if len(theirs) == len(ours):
            ratios[key] = {Fraction(a, b) for a, b in zip(theirs, ours, strict=True) if a != b and a and b}
    counts = Counter(r for rs in ratios.values() for r in rs)
    if not counts:
        return None
    factor = counts.most_common(1)[0][0]
    explained = [k for k, rs in ratios.items() if factor in rs]
    if len({k.rpartition(".")[0] for k in explained}) < 2:  # one layer (a head's weight + bias): no width
        return None
    return factor, explained


def _width_line(factor: Fraction, keys: list[str], shapes: dict[str, tuple[torch.Size, torch.Size]]) -> str:
    def only_factor(key: str) -> bool:  # an example that differs by the factor alone
        return all(a == b or Fraction(a, b) == factor for a, b in zip(*shapes[key], strict=True) if b)

    key = next((k for k in keys if only_factor(k)), keys[0])
    example = f"e.g. {key} {tuple(shapes[key][0])} vs {tuple(shapes[key][1])}"
    if factor > 1:
        wider = f"the file's layers are {float(factor):g}x wider than the model's"
    else:
        wider = f"the model's layers are {float(1 / factor):g}x wider than the file's"
    return f"shape mismatches: {wider} ({len(keys)} tensors, {example}): check model.args (width? channels?)"


def _hint(model: nn.Module, problem_keys: list[str], exclude: list[str]) -> str:
    head = head_name(model)
    if not problem_keys:  # a width factor explained them all: its line says what to check
        return ""
    if head is None or matches(f"{head}.weight", exclude):  # no head, or it is excluded already
        return "Add patterns to init_from.exclude to leave keys untouched"
    if all(k.startswith(f"{head}.") for k in problem_keys):
        return (
            f"The model's head ({head}) does not fit the file's (other classes?): start it fresh with "
            f"init_from.exclude: ['{head}.*']"
        )
    return f"Add patterns to init_from.exclude (e.g. the model's head: ['{head}.*']) to leave keys untouched"


def apply_init(model: nn.Module, cfg: InitFromConfig) -> dict[str, Any]:
    """Load `cfg.path` into `model` (minus `cfg.exclude`); every other key must match exactly, but for
    the first convolution's input channels (adapted, see `adapt_input_channels`). Returns what was
    done, for the start summary: {path, loaded, excluded, adapted}."""
    if cfg.path is None:
        return {}
    weights = load_weights(cfg.path)
    own = model.state_dict()
    for pattern in cfg.exclude:
        if not any(fnmatch(k, pattern) for k in (*weights, *own)):
            raise ConfigError(
                f"config key 'init_from.exclude': '{pattern}' matches no key of {cfg.path} or of the model "
                f"(the model's head is {head_name(model)!r}; keys look like {_listing(list(own))})"
            )
    loadable = {k: v for k, v in weights.items() if not matches(k, cfg.exclude)}
    adapted: list[str] = []
    conv = first_conv_key(model)
    conv_differs = (
        conv in loadable and conv in own and _only_channels_differ(loadable[conv].shape, own[conv].shape)
    )
    if conv_differs and cfg.adapt_input_channels:
        before = loadable[conv].shape[1]
        loadable[conv], how = adapt_input_channels(loadable[conv], own[conv].shape[1])
        adapted.append(f"{conv}: {before} -> {own[conv].shape[1]} input channels ({how})")
    problems = []
    if unexpected := sorted(k for k in loadable if k not in own):
        problems.append(f"unexpected keys (in the file, not in the model): {_listing(unexpected)}")
    if missing := sorted(k for k in own if k not in loadable and not matches(k, cfg.exclude)):
        problems.append(f"missing keys (in the model, not in the file): {_listing(missing)}")
    shapes = {
        k: (loadable[k].shape, own[k].shape)
        for k in loadable
        if k in own and own[k].shape != loadable[k].shape
    }
    mismatched = sorted(shapes)
    if width := _width_factor(shapes):
        factor, explained = width
        problems.append(_width_line(factor, explained, shapes))
        mismatched = [k for k in mismatched if k not in explained]
    if mismatched:
        listed = [f"{k} {tuple(shapes[k][0])} vs {tuple(shapes[k][1])}" for k in mismatched]
        problems.append(f"shape mismatches (file vs model): {_listing(listed)}")
    if conv in shapes and shapes[conv][0][2:] != shapes[conv][1][2:]:
        kernels = ["x".join(map(str, s[2:])) for s in shapes[conv]]
        layer = conv.rpartition(".")[0]
        problems.append(
            f"the first convolution {conv} has a {kernels[0]} kernel in the file, {kernels[1]} in the model: "
            f"another stem? (torchvision's ResNets: model.args.stem=imagenet), or start it fresh with "
            f"init_from.exclude: ['{f'{layer}.*' if layer else conv}']"
        )
    if conv_differs and not cfg.adapt_input_channels:
        problems.append(f"{conv} reads other input channels: init_from.adapt_input_channels=true adapts it")
    if problems:
        hint = _hint(model, [*unexpected, *missing, *mismatched], cfg.exclude)
        raise ConfigError(
            f"config key 'init_from': {cfg.path} does not fit model: "
            + "; ".join(problems)
            + f". {hint}".rstrip()
        )
    model.load_state_dict(loadable, strict=False)
    return {
        "path": cfg.path,
        "loaded": len(loadable),
        "excluded": sorted(k for k in own if k not in loadable),
        "adapted": adapted,
    }


def freeze(model: nn.Module, cfg: InitFromConfig) -> list[str]:
    """Freeze parameters matching `cfg.freeze`. Without `unfreeze_at_step` they stop requiring grads
    (no gradient, no optimizer state); with it they stay in the optimizer at LR 0 until that step
    (see `engine.param_groups`), because a ZeRO optimizer cannot take new parameters later."""
    names = [n for n, _ in model.named_parameters() if matches(n, cfg.freeze)]
    if cfg.freeze and not names:
        raise ConfigError(f"config key 'init_from.freeze': {cfg.freeze} matches no parameter of the model")
    if cfg.freeze_batchnorm and not frozen_batchnorms(model, cfg):
        raise ConfigError(
            f"config key 'init_from.freeze_batchnorm': no BatchNorm layer of the model has all its "
            f"parameters frozen by init_from.freeze {cfg.freeze}"
        )
    if not cfg.unfreeze_at_step:
        for name, param in model.named_parameters():
            if name in names:
                param.requires_grad_(False)
    return names


def frozen_batchnorms(model: nn.Module, cfg: InitFromConfig) -> list[nn.Module]:
    """With `init_from.freeze_batchnorm`: the BatchNorm layers whose parameters all match
    `init_from.freeze` (one without parameters: when its running_mean's name matches)."""
    if not cfg.freeze_batchnorm:
        return []
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            prefix = f"{name}." if name else ""
            keys = [prefix + p for p, _ in m.named_parameters(recurse=False)] or [f"{prefix}running_mean"]
            if all(matches(k, cfg.freeze) for k in keys):
                layers.append(m)
    return layers


def hold_batchnorm_stats(
    root: nn.Module, layers: list[nn.Module], until_step: int, steps_done: Callable[[], int]
) -> int:
    """Run the `layers` inside `root` in eval mode during training, so they normalise with, and keep,
    their running statistics (the pretrained ones). Forward hooks, no change to the model code: the
    layer's mode is switched around its own forward and restored after it (also when the forward
    raises), so `model.train()` / `model.eval()` work as usual. With `until_step` > 0
    (`init_from.unfreeze_at_step`) the statistics are held while `steps_done()` (optimizer steps taken)
    is below it, the steps in which the layers' parameters get LR 0, and update from then on.
    Hooks live on the module object: a ZeRO-3 engine keeps them, and a resumed run installs them again
    from the same config (the held statistics are buffers in its checkpoint). Returns how many."""
    inside = {id(m) for m in root.modules()}
    count = 0
    for layer in layers:
        if id(layer) not in inside:
            continue

        def before(module: nn.Module, args: Any) -> None:
            module._pipeline_mode = module.training
            if module.training and (not until_step or steps_done() < until_step):
                module.training = False

        def after(module: nn.Module, args: Any, output: Any) -> None:
            module.training = getattr(module, "_pipeline_mode", module.training)

        layer.register_forward_pre_hook(before)
        layer.register_forward_hook(after, always_call=True)
        count += 1
    return count
