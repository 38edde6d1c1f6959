"""Bad input to an environment task exits 2 naming the key, before any worker starts (no run dir)."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.__main__ import app
from tests.helpers import run_cli


class MultiDiscreteActions(gymnasium.Env):
    """Float observations, MultiDiscrete actions: a space the pipeline's policies do not handle."""

    observation_space = gymnasium.spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = gymnasium.spaces.MultiDiscrete([2, 3])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(3, np.float32), {}

    def step(self, action):
        return np.zeros(3, np.float32), 0.0, True, False, {}


TEST_ENV = "PipelineTestMultiDiscrete-v0"
if TEST_ENV not in gymnasium.registry:
    gymnasium.register(TEST_ENV, entry_point=f"{__name__}:MultiDiscreteActions")


def train(tmp_path, *overrides):
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", "configs/ppo-cartpole.yaml", f"run_dir={run}", "cluster.launcher=local", *overrides]
    )
    assert not run.exists(), "a run dir was created before the input was checked"
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["env.id=FrozenLake-v1"], "env.id", "Box"),
        (["env.id=Blackjack-v1"], "env.id", "Tuple"),
        ([f"env.id={TEST_ENV}"], "env.id", "MultiDiscrete"),
        (["env.num_envs=0"], "env.num_envs", ""),
        (["zero.stage=3"], "zero.stage", "ZeRO"),
        (["train.grad_accum=2"], "train.grad_accum", "grad_accum=1"),
        (["data.train=/tmp/nowhere"], "data.train", "remove data.train"),
        (["model.name=mlp", "model.args={}"], "model.name", "(policy, value)"),
        (["task.name=classify", "task.args={}", "data.train=/tmp/nowhere"], "env.id", "remove env.id"),
    ],
)
def test_bad_environment_input_exits_2_naming_the_key(tmp_path, overrides, key, words):
    code, output = train(tmp_path, *overrides)
    assert code == 2, output
    assert key in output and words in output, output


def test_shard_task_without_data_train_names_it(tmp_path):
    code, output = train(tmp_path, "task.name=classify", "task.args={}", "env.id=null")
    assert code == 2 and "data.train" in output, output


def test_unknown_env_id_through_the_real_cli_suggests_the_registered_one(tmp_path):
    proc = run_cli("train", "configs/ppo-cartpole.yaml", f"run_dir={tmp_path / 'run'}", "env.id=CartPole-v2")
    assert proc.returncode == 2, proc.stderr
    assert "env.id" in proc.stderr and "did you mean 'CartPole-v1'" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
