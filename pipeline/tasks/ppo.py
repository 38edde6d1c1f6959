"""Proximal Policy Optimization (Schulman et al. 2017), data-parallel as decentralized distributed PPO
(Wijmans et al. 2020) does it: every worker steps its own environments, and each minibatch's
gradients are averaged across workers by the engine, so each update sees every worker's experience.

One loop step is one PPO iteration: a rollout of `num_steps` actions in each of the worker's
`env.num_envs` environments, generalized advantage estimates (GAE), then `update_epochs` passes over
the rollout in `num_minibatches` shuffled minibatches, one optimizer update each (clipped surrogate
objective, clipped value loss, entropy bonus, advantages normalised per minibatch). The defaults are
CleanRL's ppo.py. A time-limit truncation is not a terminal state: its reward gets the discounted
value of the final observation (bootstrapping), where CleanRL treats it as terminal.

The model (model.name: actor_critic, or the user's) maps observations to `(policy, value)`: logits for
discrete actions, mean and log std side by side for box actions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.distributions import Categorical, Normal

from pipeline.tasks.base import Model, Step, Task


def distribution(policy: torch.Tensor, action_space: dict[str, Any]) -> Categorical | Normal:
    """The action distribution of a policy output (fp32: bf16 log-probabilities would make the
    probability ratios of the clipped objective coarse)."""
    policy = policy.float()
    if action_space["type"] == "discrete":
        return Categorical(logits=policy)
    mean, log_std = policy.chunk(2, dim=-1)
    return Normal(mean, log_std.exp())


def log_prob(dist: Categorical | Normal, actions: torch.Tensor) -> torch.Tensor:
    out = dist.log_prob(actions)
    return out if isinstance(dist, Categorical) else out.sum(-1)


def entropy(dist: Categorical | Normal) -> torch.Tensor:
    out = dist.entropy()
    return out if isinstance(dist, Categorical) else out.sum(-1)


def gae(
    *,
    rewards: torch.Tensor,
    values: torch.Tensor,
    ended: torch.Tensor,
    next_value: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> torch.Tensor:
    """Advantages (T, N) of a rollout: `ended[t]` marks a transition after which the episode is over
    (its observation t+1 belongs to the next episode, so nothing flows back across it); `next_value`
    is the value of the observations after the rollout."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        following = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        carry = 1.0 - ended[t]
        delta = rewards[t] + gamma * following * carry - values[t]
        running = delta + gamma * gae_lambda * carry * running
        advantages[t] = running
    return advantages


class PpoTask(Task):
    ENGINES = ("model",)
    EVAL_SUMS = 4  # Task.EPISODE_SUMS
    best_metric = "eval/return"
    best_mode = "max"
    needs_labels = False
    source = "environment"

    def __init__(
        self,
        num_steps: int = 128,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        update_epochs: int = 4,
        num_minibatches: int = 4,
        clip_coef: float = 0.2,
        clip_value_loss: bool = True,
        ent_coef: float = 0.01,
        vf_coef: float = 0.5,
        norm_adv: bool = True,
    ) -> None:
        checks = {
            "num_steps": num_steps >= 1,
            "gamma": 0.0 <= gamma <= 1.0,
            "gae_lambda": 0.0 <= gae_lambda <= 1.0,
            "update_epochs": update_epochs >= 1,
            "num_minibatches": num_minibatches >= 1,
            "clip_coef": clip_coef > 0,
            "ent_coef": ent_coef >= 0,
            "vf_coef": vf_coef >= 0,
        }
        if bad := [k for k, ok in checks.items() if not ok]:
            raise ValueError(
                f"task.args.{bad[0]}={locals()[bad[0]]} is out of range (num_steps, update_epochs, "
                "num_minibatches >= 1; gamma, gae_lambda in [0, 1]; clip_coef > 0; coefficients >= 0)"
            )
        self.num_steps, self.gamma, self.gae_lambda = num_steps, gamma, gae_lambda
        self.update_epochs, self.num_minibatches = update_epochs, num_minibatches
        self.clip_coef, self.clip_value_loss = clip_coef, clip_value_loss
        self.ent_coef, self.vf_coef, self.norm_adv = ent_coef, vf_coef, norm_adv

    def num_outputs(self, num_classes: int) -> int:
        return num_classes  # actions (discrete) or action dimensions (box): the policy head's width

    @property
    def updates_per_step(self) -> int:
        return self.update_epochs * self.num_minibatches

    def act(
        self,
        models: Mapping[str, Model],
        obs: torch.Tensor,
        *,
        action_space: dict[str, Any],
        deterministic: bool,
    ) -> torch.Tensor:
        policy, _ = models["model"](obs)
        dist = distribution(policy, action_space)
        if not deterministic:
            return dist.sample()
        return dist.probs.argmax(-1) if isinstance(dist, Categorical) else dist.mean

    def train_step(self, step: Step) -> dict[str, torch.Tensor]:
        assert step.envs is not None, "an environment task runs with env.id (the loop gives step.envs)"
        rollout = self.collect(step)
        return self.learn(step, rollout)

    @torch.no_grad()
    def collect(self, step: Step) -> dict[str, torch.Tensor]:
        """A rollout of num_steps x num_envs transitions with the current policy, and its advantages."""
        envs, model = step.envs, step.models["model"]
        assert envs is not None
        device = next(model.module.parameters()).device
        space = envs.action_space
        obs_now = torch.as_tensor(envs.observations, device=device)
        columns: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("obs", "actions", "logprobs", "values", "rewards", "ended")
        }
        for _ in range(self.num_steps):
            policy, value = model(obs_now)
            dist = distribution(policy, space)
            actions = dist.sample()  # the global RNG: restored exactly on resume
            obs, rewards, terminated, truncated, final = envs.step(actions.cpu().numpy())
            rewards_t = torch.as_tensor(rewards, device=device)
            bootstrap = [i for i in final if truncated[i] and not terminated[i]]
            if bootstrap:  # a time limit is not a terminal state: the episode's value goes on
                _, final_values = model(
                    torch.as_tensor(np.stack([final[i] for i in bootstrap]), device=device)
                )
                rewards_t[bootstrap] += self.gamma * final_values.float()
            for key, value_t in (
                ("obs", obs_now),
                ("actions", actions),
                ("logprobs", log_prob(dist, actions)),
                ("values", value.float()),
                ("rewards", rewards_t),
                ("ended", torch.as_tensor(terminated | truncated, device=device, dtype=torch.float32)),
            ):
                columns[key].append(value_t)
            obs_now = torch.as_tensor(obs, device=device)
        _, next_value = model(obs_now)
        rollout = {k: torch.stack(v) for k, v in columns.items()}
        rollout["advantages"] = gae(
            rewards=rollout["rewards"],
            values=rollout["values"],
            ended=rollout["ended"],
            next_value=next_value.float(),
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
        )
        rollout["returns"] = rollout["advantages"] + rollout["values"]
        return {k: v.flatten(0, 1) for k, v in rollout.items()}

    def learn(self, step: Step, rollout: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """update_epochs x num_minibatches updates on the rollout; the step's losses are the means over
        its updates (device tensors: no host sync)."""
        assert step.envs is not None
        space, model = step.envs.action_space, step.models["model"]
        size = rollout["values"].shape[0]
        minibatch = max(1, size // self.num_minibatches)
        sums: dict[str, torch.Tensor] = {}
        for _ in range(self.update_epochs):
            order = torch.randperm(size, device=rollout["values"].device)  # the global RNG
            for start in range(0, minibatch * self.num_minibatches, minibatch):
                index = order[start : start + minibatch]
                losses = self.losses(model, {k: v[index] for k, v in rollout.items()}, space)
                if not step.update("model", losses["loss"]):
                    return {}  # skipped on every rank (a non-finite loss somewhere)
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0.0) + value.detach()
        out = {key: value / self.updates_per_step for key, value in sums.items()}
        variance = rollout["returns"].var()
        out["explained_variance"] = 1 - (rollout["returns"] - rollout["values"]).var() / variance.clamp_min(
            1e-8
        )
        return out

    def losses(
        self, model: Model, batch: dict[str, torch.Tensor], space: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """The clipped surrogate, value and entropy terms of one minibatch, and the diagnostics."""
        policy, value = model(batch["obs"])
        dist = distribution(policy, space)
        logratio = log_prob(dist, batch["actions"]) - batch["logprobs"]
        ratio = logratio.exp()
        advantages = batch["advantages"]
        if self.norm_adv:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        policy_loss = torch.max(
            -advantages * ratio, -advantages * ratio.clamp(1 - self.clip_coef, 1 + self.clip_coef)
        ).mean()
        value = value.float()
        if self.clip_value_loss:
            clipped = batch["values"] + (value - batch["values"]).clamp(-self.clip_coef, self.clip_coef)
            value_loss = (
                0.5 * torch.max((value - batch["returns"]) ** 2, (clipped - batch["returns"]) ** 2).mean()
            )
        else:
            value_loss = 0.5 * ((value - batch["returns"]) ** 2).mean()
        entropy_mean = entropy(dist).mean()
        with torch.no_grad():
            approx_kl = ((ratio - 1) - logratio).mean()  # the low-variance estimator (Schulman's blog)
            clip_fraction = ((ratio - 1).abs() > self.clip_coef).float().mean()
        return {
            "loss": policy_loss - self.ent_coef * entropy_mean + self.vf_coef * value_loss,
            "policy_loss": policy_loss,
            "value_loss": value_loss,
            "entropy": entropy_mean,
            "approx_kl": approx_kl,
            "clip_fraction": clip_fraction,
        }

    def eval_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        return self.episode_metrics(sums)
