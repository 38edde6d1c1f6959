"""The PPO recipe (configs/ppo-cartpole.yaml, tiny rollouts) under ZeRO 0, 1 and 2 x fp32/bf16 with 1
and 2 workers: no error, finite losses, every parameter changes, the env-step count is the planned one.

Each world size is one start of the local launcher's own worker (`pipeline.launch.local.worker`, gloo)
that runs its 6 (stage, precision) runs in turn through the real training loop, so the 12 cases cost
2 process starts. ZeRO-3 is refused for environment tasks (tests/unit/test_rl_config.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import config, models, tasks
from pipeline.checkpoint import commit, export
from pipeline.launch.plan import make_plan, worker_payload
from tests.helpers import read_jsonl, run_local_pair

pytestmark = pytest.mark.dist

STAGES = (0, 1, 2)
PRECISIONS = ("fp32", "bf16")
STEPS, NUM_STEPS, NUM_ENVS = 3, 16, 2


def initial_weights(cfg, spec):
    """What the loop starts from: the model built under the run's seed."""
    task = tasks.build(cfg.task.name, cfg.task.args)
    torch.manual_seed(cfg.seed)
    model = models.build(
        cfg.model.name,
        cfg.model.args,
        spec.sample_shape,
        task.num_outputs(spec.num_classes),
        action_space=spec.action_space,
    )
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [1, 2])
def test_ppo_trains_under_every_zero_stage_and_precision(workers, tmp_path):
    plans = {}
    for stage in STAGES:
        for precision in PRECISIONS:
            name = f"zero{stage}-{precision}-w{workers}"
            cfg = config.load(
                "configs/ppo-cartpole.yaml",
                [
                    f"run_dir={tmp_path / name}",
                    f"zero.stage={stage}",
                    f"precision={precision}",
                    f"cluster.num_workers={workers}",
                    "cluster.launcher=local",
                    "cluster.collective_timeout_s=120",
                    f"env.num_envs={NUM_ENVS}",
                    "env.eval_episodes=2",
                    f"task.args.num_steps={NUM_STEPS}",
                    "task.args.update_epochs=2",
                    "task.args.num_minibatches=2",
                    f"train.max_steps={STEPS}",
                    "train.log_every=1",
                    "train.eval_every=0",
                    "checkpoint.every=0",
                    "optim.lr=1e-3",
                    "tracking.wandb.mode=disabled",
                ],
            )
            plans[name] = make_plan(cfg)
    run_local_pair([worker_payload(plan, name) for name, plan in plans.items()], nprocs=workers)

    for name, plan in plans.items():
        rows = read_jsonl(tmp_path / name / "metrics.jsonl")
        logged = [r for r in rows if "train/loss" in r]
        assert [r["step"] for r in logged] == list(range(1, STEPS + 1)), (name, rows)
        for key in ("loss", "policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction"):
            values = [r[f"train/{key}"] for r in logged]
            assert all(math.isfinite(v) for v in values), (name, key, values)
        # every env step of every worker counted: rollouts x num_steps x num_envs x workers
        assert logged[-1]["train/env_steps"] == STEPS * NUM_STEPS * NUM_ENVS * workers, name
        (final,) = [r for r in rows if "eval/return" in r]
        assert final["eval/episodes"] == 2 and math.isfinite(final["eval/return"]), name

        ckpt = tmp_path / name / "checkpoints" / f"step_{STEPS:08d}"
        manifest = commit.verify(ckpt)
        assert manifest["world_size"] == workers and manifest["zero_stage"] == plan.cfg.zero.stage, name
        before = initial_weights(plan.cfg, plan.spec)
        after = export.consolidated_state_dict(ckpt, "model")
        assert sorted(after) == sorted(before), name
        unchanged = [k for k in before if torch.equal(after[k].float(), before[k].float())]
        assert not unchanged, f"{name}: unchanged {unchanged}"
