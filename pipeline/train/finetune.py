"""Fine-tuning: load `init_from` weights into a fresh model, freeze what is asked, name LR groups.

Used twice: by the launcher's preflight (a key mismatch is a usage error, exit 2, before any worker
starts) and by every worker before its engine is built.
"""

from __future__ import annotations

from fnmatch import fnmatch
from typing import Any

from torch import nn

from pipeline.checkpoint.weights import load_weights
from pipeline.config import ConfigError, InitFromConfig

SHOWN = 5  # keys listed per problem in an error


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch(name, p) for p in patterns)


def _listing(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def apply_init(model: nn.Module, cfg: InitFromConfig) -> dict[str, Any]:
    """Load `cfg.path` into `model` (minus `cfg.exclude`); every other key must match exactly."""
    if cfg.path is None:
        return {}
    weights = load_weights(cfg.path)
    own = model.state_dict()
    loadable = {k: v for k, v in weights.items() if not matches(k, cfg.exclude)}
    problems = []
    if unexpected := sorted(k for k in loadable if k not in own):
        problems.append(f"unexpected keys (in the file, not in the model): {_listing(unexpected)}")
    if missing := sorted(k for k in own if k not in loadable and not matches(k, cfg.exclude)):
        problems.append(f"missing keys (in the model, not in the file): {_listing(missing)}")
    if mismatched := sorted(k for k in loadable if k in own and own[k].shape != loadable[k].shape):
        shapes = [f"{k} {tuple(loadable[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]
        problems.append(f"shape mismatches (file vs model): {_listing(shapes)}")
    if problems:
        raise ConfigError(
            f"config key 'init_from': {cfg.path} does not fit model: "
            + "; ".join(problems)
            + ". Add patterns to init_from.exclude (e.g. a new head: ['head.*']) to leave keys untouched"
        )
    model.load_state_dict(loadable, strict=False)
    return {"loaded": len(loadable), "excluded": sorted(k for k in own if k not in loadable)}


def freeze(model: nn.Module, cfg: InitFromConfig) -> list[str]:
    """Freeze parameters matching `cfg.freeze`. Without `unfreeze_at_step` they stop requiring grads
    (no gradient, no optimizer state); with it they stay in the optimizer at LR 0 until that step
    (see `engine.param_groups`), because a ZeRO optimizer cannot take new parameters later."""
    names = [n for n, _ in model.named_parameters() if matches(n, cfg.freeze)]
    if cfg.freeze and not names:
        raise ConfigError(f"config key 'init_from.freeze': {cfg.freeze} matches no parameter of the model")
    if not cfg.unfreeze_at_step:
        for name, param in model.named_parameters():
            if name in names:
                param.requires_grad_(False)
    return names
