"""TrainState: everything besides the engines that a resumed run needs, as one explicit object."""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field
from typing import Any


def new_run_id() -> str:
    return secrets.token_hex(4)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    samples_seen: int = 0  # good samples consumed by all workers
    samples_skipped: int = 0  # bad samples skipped by all workers (data.on_error=skip)
    run_id: str = field(default_factory=new_run_id)  # the tracking (W&B) run id, kept across resumes
    config_digest: str = ""
    world_size: int = 1
    data_cursor: dict[str, Any] | None = None  # pipeline.data.cursor.Cursor.to_dict() of all ranks
    rng: list[dict[str, Any]] = field(default_factory=list)  # RNG states of every rank, in rank order
    nonfinite_steps: int = 0  # steps skipped for a NaN/Inf loss
    # an environment task's environments (envs.VectorEnvs.local_state() of every rank, in rank order);
    # samples_seen then counts environment steps
    env_states: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)
