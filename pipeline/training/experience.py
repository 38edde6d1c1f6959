"""An environment task's side of the run: its environments in place of shards, their episode
statistics at log steps, and evaluation by episodes of the deterministic policy.

`EnvironmentSource` stands where a shard task's TrainBatches stands in the run context: the checkpoint
policy saves every rank's environment states (TrainState.env_states, in rank order) as it saves data
cursors, and a resume with the same world size restores them exactly. With another world size the
per-rank environments cannot carry over (other copies, other seeds): every rank starts new episodes,
seeded by (seed, rank, env index, resume step); the weights, optimizer, step and env-step counters
carry over, the episodes in progress and the log window's unfinished statistics do not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from pipeline import envs as envs_mod
from pipeline.config import Config
from pipeline.data.shards import DataSpec
from pipeline.tasks.base import Model, Task
from pipeline.training import collectives
from pipeline.training.state import TrainState


class EnvironmentSource:
    """One worker's environments, as the run context holds a data source."""

    wait_s = 0.0  # no loader: stepping the environments is part of the task's step time
    epoch = 0

    def __init__(self, cfg: Config, *, rank: int, world_size: int, state: TrainState | None) -> None:
        """`state`: the resumed TrainState (None: a fresh start)."""
        saved = state.env_states if state is not None else []
        same_world = len(saved) == world_size
        stream = state.step if state is not None and not same_world else 0
        self.envs = envs_mod.VectorEnvs(cfg.env, seed=cfg.seed, rank=rank, stream=stream)
        if state is not None and same_world:
            self.envs.restore(saved[rank])
        self.restored = state is not None and same_world
        self._counted = self.envs.steps  # counted in TrainState.samples_seen before the resume

    def assignment(self) -> tuple[int, int]:
        return 0, 0  # no shards

    def local_state(self) -> dict[str, Any]:
        return self.envs.local_state()

    def take_steps(self) -> int:
        """Environment steps this worker took since the last call (the run's sample counter)."""
        taken, self._counted = self.envs.steps - self._counted, self.envs.steps
        return taken

    def close(self) -> None:
        self.envs.close()


def episode_window(source: EnvironmentSource) -> dict[str, float]:
    """Collective: the episodes every rank finished since the last log (one gather): train/
    episode_return and episode_length (means over those episodes, all ranks), their count, and each
    rank's mean return as train/episode_return/rank<R>. Nothing when no episode finished."""
    windows = collectives.gather_objects(source.envs.take_window())
    episodes = sum(w[0] for w in windows)
    if not episodes:
        return {}
    metrics = {
        "train/episode_return": sum(w[1] for w in windows) / episodes,
        "train/episode_length": sum(w[2] for w in windows) / episodes,
        "train/episodes": episodes,
    }
    for rank, (count, total, _) in enumerate(windows):
        if count:
            metrics[f"train/episode_return/rank{rank}"] = total / count
    return metrics


def evaluate_episodes(
    models: Mapping[str, Model], *, task: Task, cfg: Config, spec: DataSpec, device: str
) -> dict[str, float]:
    """Collective (one all-reduce): `env.eval_episodes` episodes of the deterministic policy, split
    over the ranks (episode e on rank e % world), summed into Task.EPISODE_SUMS. Each episode's seed
    depends on its index only, so the figures are the same for any world size (and for `pipeline
    eval`). The forwards are local: ZeRO 0-2 only (plan.py refuses ZeRO-3 for environment tasks)."""
    rank, world = collectives.rank_and_world()
    mine = list(range(rank, cfg.env.eval_episodes, world))
    results = run_policy(models, task=task, cfg=cfg, spec=spec, device=device, episodes=mine)
    returns = np.array([r for r, _ in results], dtype=np.float64)
    sums = torch.tensor(
        [float(len(results)), returns.sum(), (returns**2).sum(), float(sum(n for _, n in results))],
        dtype=torch.float64,
    )
    sums = collectives.all_reduce(sums.to(collectives.tensor_device())).cpu()
    return task.eval_metrics(sums)


@torch.no_grad()
def run_policy(
    models: Mapping[str, Model], *, task: Task, cfg: Config, spec: DataSpec, device: str, episodes: list[int]
) -> list[tuple[float, int]]:
    """(return, length) of the given evaluation episodes, acting deterministically; the global RNG is
    left as it was (evaluating changes nothing the training sees)."""
    assert spec.action_space is not None

    def act(obs: np.ndarray) -> np.ndarray:
        actions = task.act(
            models, torch.as_tensor(obs, device=device), action_space=spec.action_space, deterministic=True
        )
        return actions.float().cpu().numpy() if spec.action_space["type"] == "box" else actions.cpu().numpy()

    cuda = [torch.device(device)] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=cuda):
        return envs_mod.run_episodes(
            cfg.env, seed=cfg.seed, episodes=episodes, act=act, batch=max(cfg.env.num_envs, 8)
        )
