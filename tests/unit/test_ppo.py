"""PPO pieces: GAE against a plain reference, the clipped loss terms on a hand-made batch, act(),
the actor-critic's shapes, and the LR schedule with several updates per loop step."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import OptimConfig
from pipeline.engine import _group_schedule
from pipeline.models.actor_critic import ActorCritic
from pipeline.tasks.ppo import PpoTask, gae

DISCRETE = {"type": "discrete", "n": 3}
BOX = {"type": "box", "shape": [2], "low": [-1.0, -1.0], "high": [1.0, 1.0]}


def reference_gae(rewards, values, ended, next_value, gamma, lam):
    """Per environment, backwards, the textbook recursion with plain floats."""
    steps, n = len(rewards), len(rewards[0])
    out = [[0.0] * n for _ in range(steps)]
    for i in range(n):
        running = 0.0
        for t in reversed(range(steps)):
            following = next_value[i] if t == steps - 1 else values[t + 1][i]
            alive = 0.0 if ended[t][i] else 1.0
            delta = rewards[t][i] + gamma * following * alive - values[t][i]
            running = delta + gamma * lam * alive * running
            out[t][i] = running
    return out


def test_gae_matches_the_reference_with_episode_ends_and_bootstrap():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.rand(7, 3, generator=g), torch.rand(7, 3, generator=g)
    ended = torch.zeros(7, 3)
    ended[2, 0] = ended[6, 1] = ended[0, 2] = ended[3, 2] = 1.0  # the last step's end cuts the bootstrap
    next_value = torch.tensor([0.5, 2.0, -1.0])
    got = gae(rewards=rewards, values=values, ended=ended, next_value=next_value, gamma=0.9, gae_lambda=0.8)
    want = reference_gae(rewards.tolist(), values.tolist(), ended.tolist(), next_value.tolist(), 0.9, 0.8)
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    # env 1 ended at the last step: its last advantage ignores next_value
    assert got[6, 1].item() == pytest.approx(rewards[6, 1].item() - values[6, 1].item(), abs=1e-6)
    # lambda = 1, gamma = 1, no ends: advantage = sum of the remaining rewards + bootstrap - value
    flat = gae(
        rewards=rewards,
        values=values,
        ended=torch.zeros(7, 3),
        next_value=next_value,
        gamma=1.0,
        gae_lambda=1.0,
    )
    want0 = rewards[:, 0].sum() + next_value[0] - values[0, 0]
    assert flat[0, 0].item() == pytest.approx(want0.item(), abs=1e-5)


class Fixed(torch.nn.Module):
    """A model with a given policy output and value, whatever the observation."""

    def __init__(self, policy, value):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, obs):
        return self.policy.expand(len(obs), -1), self.value.expand(len(obs))


def test_clipped_loss_terms_on_a_hand_made_batch():
    task = PpoTask(clip_coef=0.2, norm_adv=False, clip_value_loss=False, ent_coef=0.0, vf_coef=0.5)
    logits = torch.log(torch.tensor([[0.5, 0.5]]))  # every action has probability 1/2
    model = Fixed(logits, torch.tensor([1.0]))
    old = torch.log(torch.tensor([0.25, 0.5]))  # ratios 2 (clipped to 1.2) and 1
    batch = {
        "obs": torch.zeros(2, 1),
        "actions": torch.tensor([0, 1]),
        "logprobs": old,
        "advantages": torch.tensor([1.0, -1.0]),
        "returns": torch.tensor([3.0, 1.0]),
        "values": torch.tensor([1.0, 1.0]),
    }
    out = task.losses(model, batch, {"type": "discrete", "n": 2})
    # pessimistic: max(-A r, -A clip(r)): sample 0 -> max(-2, -1.2) = -1.2, sample 1 -> 1
    assert out["policy_loss"].item() == pytest.approx((-1.2 + 1.0) / 2)
    assert out["value_loss"].item() == pytest.approx(0.5 * (4.0 + 0.0) / 2)
    assert out["entropy"].item() == pytest.approx(math.log(2))
    assert out["clip_fraction"].item() == pytest.approx(0.5)
    assert out["approx_kl"].item() == pytest.approx(((2 - 1) - math.log(2)) / 2)
    assert out["loss"].item() == pytest.approx(out["policy_loss"].item() + 0.5 * out["value_loss"].item())


@pytest.mark.parametrize("space", [DISCRETE, BOX])
@pytest.mark.parametrize("shared", [False, True])
def test_actor_critic_shapes_and_deterministic_act(space, shared):
    width = space["n"] if space["type"] == "discrete" else space["shape"][0]
    model = ActorCritic((4,), width, action_space=space, hidden=(8,), shared_trunk=shared)
    assert (model.critic_trunk is None) == shared
    policy, value = model(torch.randn(5, 4))
    assert policy.shape == (5, width if space["type"] == "discrete" else 2 * width) and value.shape == (5,)
    task, obs = PpoTask(), torch.randn(6, 4)
    first = task.act({"model": model}, obs, action_space=space, deterministic=True)
    torch.manual_seed(123)  # the global RNG plays no part in a deterministic action
    again = task.act({"model": model}, obs, action_space=space, deterministic=True)
    assert torch.equal(first, again)
    if space["type"] == "discrete":
        assert torch.equal(first, policy_of(model, obs).argmax(-1))
    else:
        assert torch.equal(first, policy_of(model, obs)[:, :width])


def policy_of(model, obs):
    with torch.no_grad():
        return model(obs)[0]


def test_lr_constant_within_a_loop_step_and_linear_across_steps():
    optim = OptimConfig(lr=1.0, schedule="linear", warmup_steps=0)
    factor = _group_schedule(optim, max_steps=10, start_step=0, updates_per_step=8)
    per_step = [[factor(step * 8 + u) for u in range(8)] for step in range(10)]
    assert all(len(set(row)) == 1 for row in per_step)
    firsts = [row[0] for row in per_step]
    assert firsts == pytest.approx([1.0 - s / 10 for s in range(10)])
