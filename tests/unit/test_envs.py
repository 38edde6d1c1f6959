"""pipeline.envs: environment state as plain data (exact round trip, tampering refused), per-(seed,
rank, env index) seeding, and evaluation episodes independent of how they are split."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from pipeline import envs
from pipeline.config import EnvConfig

pytest.importorskip("gymnasium")

CLASSIC = ["CartPole-v1", "Acrobot-v1", "MountainCar-v0", "Pendulum-v1"]


def random_actions(vec, rng, n):
    space = vec.action_space
    if space["type"] == "discrete":
        return rng.integers(0, space["n"], size=n)
    return rng.uniform(-3.0, 3.0, size=(n, space["shape"][0])).astype(np.float32)


@pytest.mark.parametrize("env_id", CLASSIC)
def test_state_round_trip_through_json_is_exact(env_id):
    cfg = EnvConfig(id=env_id, num_envs=3, max_episode_steps=25)  # short episodes: resets happen
    rng = np.random.default_rng(0)
    vec = envs.VectorEnvs(cfg, seed=5, rank=1)
    for _ in range(40):
        vec.step(random_actions(vec, rng, 3))
    saved = json.loads(json.dumps(vec.local_state()))
    copy_ = envs.VectorEnvs(cfg, seed=99, rank=0)  # another seed: everything comes from the state
    copy_.restore(saved)
    assert np.array_equal(copy_.observations, vec.observations)
    for _ in range(60):
        actions = random_actions(vec, rng, 3)
        a, b = vec.step(actions), copy_.step(actions)
        for x, y in zip(a[:4], b[:4], strict=True):
            assert x.tobytes() == y.tobytes()
        assert sorted(a[4]) == sorted(b[4])
        for i in a[4]:
            assert a[4][i].tobytes() == b[4][i].tobytes()
    assert vec.take_window() == copy_.take_window() and vec.steps == copy_.steps


def test_seeding_differs_per_rank_and_env_and_is_reproducible():
    cfg = EnvConfig(id="CartPole-v1", num_envs=3)
    first = {r: envs.VectorEnvs(cfg, seed=1, rank=r).observations for r in (0, 1)}
    again = envs.VectorEnvs(cfg, seed=1, rank=0).observations
    assert np.array_equal(first[0], again)
    rows = [tuple(row) for r in (0, 1) for row in first[r]]
    assert len(set(rows)) == 6  # every (rank, env index) starts elsewhere
    assert not np.array_equal(envs.VectorEnvs(cfg, seed=2, rank=0).observations, first[0])


def test_tampered_state_is_refused():
    cfg = EnvConfig(id="CartPole-v1", num_envs=1)
    vec = envs.VectorEnvs(cfg, seed=0, rank=0)
    saved = json.loads(json.dumps(vec.local_state()))
    bad_attr = copy.deepcopy(saved)
    bad_attr["envs"][0]["layers"][-1]["attrs"]["step"] = {"plain": "not state"}
    with pytest.raises(ValueError, match="not state"):
        envs.VectorEnvs(cfg, seed=0, rank=0).restore(bad_attr)
    bad_rng = copy.deepcopy(saved)
    bad_rng["envs"][0]["rng"]["bit_generator"] = "os.system"
    with pytest.raises(ValueError, match="RNG 'os.system'"):
        envs.VectorEnvs(cfg, seed=0, rank=0).restore(bad_rng)
    other = copy.deepcopy(saved)
    other["env_id"] = "Acrobot-v1"
    with pytest.raises(ValueError, match="cannot restore"):
        envs.VectorEnvs(cfg, seed=0, rank=0).restore(other)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_run_episodes_is_the_same_however_split(env_id):
    cfg = EnvConfig(id=env_id, num_envs=1, max_episode_steps=30)
    box = envs.spaces(cfg)["action_space"]["type"] == "box"

    def act(obs):  # deterministic in the observation alone
        return np.tanh(obs[:, :1]) if box else (obs[:, 0] > 0).astype(np.int64)

    whole = envs.run_episodes(cfg, seed=3, episodes=list(range(6)), act=act, batch=6)
    split = {}
    for part, batch in (([0, 2, 4], 1), ([1, 3, 5], 2)):
        split |= dict(
            zip(part, envs.run_episodes(cfg, seed=3, episodes=part, act=act, batch=batch), strict=True)
        )
    assert whole == [split[e] for e in range(6)]
    assert len({r for r, _ in whole}) > 1 or box  # the episodes really differ (their own seeds)
