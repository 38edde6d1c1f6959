"""An actor-critic MLP for environment tasks (PPO): a policy head and a value head over observations.

`forward(obs)` returns `(policy, value)`: for a discrete action space the policy is the logits of a
categorical distribution (B, n); for a box action space it is the Gaussian's mean and log std side by
side (B, 2 x D), with a learned state-independent log std, as in CleanRL's ppo_continuous_action.py.
Layers are initialised orthogonally (gain sqrt(2) in the trunks, 0.01 on the policy head, 1 on the
value head), the initialisation the PPO implementation studies found to matter (Andrychowicz et al.
2021; Huang et al., "The 37 implementation details of PPO").
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pipeline.models.layers import make_activation


def _layer(width_in: int, width_out: int, gain: float) -> nn.Linear:
    layer = nn.Linear(width_in, width_out)
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def _trunk(width_in: int, hidden: tuple[int, ...], activation: str) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = [nn.Flatten()]
    for width in hidden:
        layers += [_layer(width_in, width, math.sqrt(2)), make_activation(activation)]
        width_in = width
    return nn.Sequential(*layers), width_in


class ActorCritic(nn.Module):
    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        action_space: dict[str, Any] | None = None,
        hidden: tuple[int, ...] = (64, 64),
        activation: str = "tanh",
        shared_trunk: bool = False,
        init_log_std: float = 0.0,
    ) -> None:
        """`num_classes`: actions (discrete) or action dimensions (box); `action_space` (from the
        environment) says which; `shared_trunk`: one trunk under both heads instead of two."""
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"an actor-critic needs at least one action, got num_classes={num_classes}")
        self.continuous = bool(action_space) and action_space.get("type") == "box"
        width_in = math.prod(input_shape)
        self.actor_trunk, width = _trunk(width_in, hidden, activation)
        self.critic_trunk = None if shared_trunk else _trunk(width_in, hidden, activation)[0]
        self.policy_head = _layer(width, num_classes, 0.01)
        self.value_head = _layer(width, 1, 1.0)
        self.log_std = nn.Parameter(torch.full((num_classes,), init_log_std)) if self.continuous else None

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.actor_trunk(obs)
        critic = features if self.critic_trunk is None else self.critic_trunk(obs)
        policy, value = self.policy_head(features), self.value_head(critic).squeeze(-1)
        if self.log_std is not None:
            policy = torch.cat([policy, self.log_std.expand_as(policy).to(policy.dtype)], dim=-1)
        return policy, value
