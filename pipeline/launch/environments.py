"""Preflight of an environment task (task.name: ppo): its environments and the model that acts in
them, checked on the driver before any worker starts (ConfigError: exit 2 naming the key)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline import envs
from pipeline.config import Config, ConfigError
from pipeline.data.shards import DataSpec


def environment_spec(cfg: Config) -> DataSpec:
    """What the workers build the model for: the observation shape as the sample shape, the number of
    actions (discrete) or action dimensions (box) as num_classes, and the action space."""
    if cfg.data.train is not None:
        raise ConfigError(
            f"config key 'data.train': task '{cfg.task.name}' learns from environments (env.id), not "
            "shards: remove data.train"
        )
    if cfg.zero.stage == 3:
        raise ConfigError(
            "config key 'zero.stage': environment tasks train under ZeRO 0, 1 or 2; under ZeRO-3 every "
            "forward is a collective, and each worker's episodes end at different steps"
        )
    if cfg.train.grad_accum != 1:
        raise ConfigError(
            f"config key 'train.grad_accum': an environment task updates from its own rollouts "
            "(task.args.num_minibatches sets the update size); set train.grad_accum=1, not "
            f"{cfg.train.grad_accum}"
        )
    spaces = envs.spaces(cfg.env)
    action = spaces["action_space"]
    return DataSpec(
        train_urls=[],
        val_urls=[],
        train_samples=0,
        val_samples=0,
        train_counts=[],
        val_counts=[],
        sample_shape=spaces["observation_shape"],
        num_classes=action["n"] if action["type"] == "discrete" else action["shape"][0],
        mean=[0.0],
        std=[1.0],
        kind="environment",
        label_type=None,
        action_space=action,
    )


def policy_width(action: dict[str, Any]) -> int:
    """The policy output's width: logits per action, or mean and log std per action dimension."""
    return action["n"] if action["type"] == "discrete" else 2 * action["shape"][0]


def check_policy(cfg: Config, model: nn.Module, spec: DataSpec) -> None:
    """That the model maps a batch of observations to (policy (B, width), value (B,)): a forward on
    zeros, here rather than in every worker's first step."""
    assert spec.action_space is not None
    width, batch = policy_width(spec.action_space), 2
    where = f"config key 'model.name': model '{cfg.model.name}' with env.id={cfg.env.id}"
    try:
        with torch.no_grad():
            out = model(torch.zeros(batch, *spec.sample_shape))
    except Exception as e:
        raise ConfigError(
            f"{where} cannot take a batch of observations of shape {tuple(spec.sample_shape)}: "
            f"{type(e).__name__}: {e}"
        ) from None
    ok = (
        isinstance(out, tuple)
        and len(out) == 2
        and all(isinstance(t, torch.Tensor) for t in out)
        and tuple(out[0].shape) == (batch, width)
        and tuple(out[1].shape) == (batch,)
    )
    if not ok:
        got = (
            tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in out)
            if isinstance(out, tuple)
            else type(out).__name__
        )
        raise ConfigError(
            f"{where}: an environment task's model returns (policy, value) of shapes (B, {width}) and (B,) "
            f"for {envs_description(spec.action_space)}; it returned {got} (use model.name=actor_critic)"
        )


def envs_description(action: dict[str, Any]) -> str:
    if action["type"] == "discrete":
        return f"{action['n']} discrete actions"
    return f"a {action['shape'][0]}-dimensional box action (mean and log std)"


def describe(cfg: Config, spec: DataSpec, world_size: int) -> list[str]:
    """The dry-run lines of an environment task: what steps the environments and how much per step."""
    assert spec.action_space is not None
    rollout = int(cfg.task.args.get("num_steps", 128))
    per_step = rollout * cfg.env.num_envs * world_size
    return [
        f"envs          {cfg.env.id} x {cfg.env.num_envs} per worker: observations "
        f"{tuple(spec.sample_shape)}, {envs_description(spec.action_space)}",
        f"steps         {cfg.train.max_steps} rollouts x {per_step} env steps ({rollout}/env x "
        f"{cfg.env.num_envs} envs x {world_size} workers) = {cfg.train.max_steps * per_step:,} env steps",
    ]
