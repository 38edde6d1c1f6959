"""The deterministic policy of an environment task's checkpoint as a self-contained program
(`pipeline export` of a PPO run): FILE.policy.pt2, a `torch.export` ExportedProgram that loads with
plain torch and needs neither the pipeline nor the model's source code:

    import torch
    policy = torch.export.load("FILE.policy.pt2").module()
    actions = policy(torch.as_tensor(obs, dtype=torch.float32))   # obs: (B, *observation shape)

It maps a batch of observations to the actions `pipeline eval` takes: the task's own `act(...,
deterministic=True)` traced from the checkpoint's fp32 weights (for PPO: the most probable action,
int64 of shape (B,), for a discrete space; the Gaussian's mean clipped to the action bounds, float32
of shape (B, D), for a box). The batch size is dynamic (any B >= 1). FILE.json says which
environment (`env`: id, args, max_episode_steps) and spaces the policy was trained for.

torch.export, not TorchScript: TorchScript is deprecated in torch 2.x, torch.export is its successor
(a .pt2 holds the graph of ATen operators and the weights, read back by `torch.export.load`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import models, tasks
from pipeline.checkpoint.commit import read_manifest
from pipeline.tasks.base import Task, forward_only

SUFFIX = ".policy.pt2"


class DeterministicPolicy(nn.Module):
    """observations (B, *obs) float32 -> the task's deterministic actions, as the environment takes
    them (a box action clipped to its bounds, as pipeline.envs.to_env_action clips it)."""

    def __init__(self, task: Task, parts: dict[str, nn.Module], action_space: dict[str, Any]) -> None:
        super().__init__()
        self.task, self.action_space = task, action_space
        self.parts = nn.ModuleDict(parts)
        box = action_space["type"] == "box"
        self.register_buffer("low", torch.tensor(action_space["low"] if box else [], dtype=torch.float32))
        self.register_buffer("high", torch.tensor(action_space["high"] if box else [], dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        actions = self.task.act(
            forward_only(dict(self.parts)), obs, action_space=self.action_space, deterministic=True
        )
        if self.action_space["type"] == "box":
            return torch.clamp(actions.float(), self.low, self.high)
        return actions


def load_policy(ckpt: Path, state_dicts: dict[str, dict[str, torch.Tensor]]) -> DeterministicPolicy:
    """The checkpoint's deterministic policy as an eager module, from its engines' fp32 weights
    (`state_dicts`: engine name -> consolidated state_dict)."""
    manifest = read_manifest(ckpt)
    meta = manifest["model"]
    model = models.build(
        meta["name"], meta["args"], meta["input_shape"], meta["num_classes"], meta.get("action_space")
    )
    task = tasks.build(manifest["task"]["name"], manifest["task"]["args"])
    parts = task.split(model)
    for name, module in parts.items():
        module.load_state_dict(state_dicts[name], strict=True)
    model.eval().requires_grad_(False)
    return DeterministicPolicy(task, parts, meta["action_space"]).eval()


@contextlib.contextmanager
def _no_distribution_checks() -> Iterator[None]:
    """torch.distributions validates its arguments with data-dependent checks, which a traced
    program cannot hold; the weights are the checkpoint's own, so the checks add nothing here."""
    before = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(before)


def export_policy(policy: DeterministicPolicy, input_shape: list[int], out: Path) -> Path:
    """Trace `policy` with a dynamic batch size and write it with torch.export.save (beside `out`,
    then renamed, so an existing file is never half-overwritten). Returns `out`."""
    example = torch.zeros(2, *input_shape)
    batch = torch.export.Dim("batch", min=1)
    with _no_distribution_checks(), torch.no_grad():
        program = torch.export.export(policy, (example,), dynamic_shapes=({0: batch},), strict=False)
    tmp = out.with_name(f".{out.name}.tmp.pt2")
    torch.export.save(program, tmp)
    os.replace(tmp, out)
    return out


def describe(meta_model: dict[str, Any], env: dict[str, Any] | None, path: Path) -> dict[str, Any]:
    """FILE.json's `policy` entry: where the program is, what goes in and what comes out."""
    space = meta_model["action_space"]
    shape = ", ".join(["B"] + [str(d) for d in meta_model["input_shape"]])
    output = (
        f"int64 (B,): action index in 0..{space['n'] - 1}"
        if space["type"] == "discrete"
        else f"float32 (B, {space['shape'][0]}): action within [low, high]"
    )
    return {
        "file": path.name,
        "format": "torch.export",
        "load": f"torch.export.load('{path.name}').module()",
        "input": f"float32 ({shape}): observations",
        "output": output,
        "action_space": space,
        "env": env,
    }
