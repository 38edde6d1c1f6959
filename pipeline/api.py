"""The public Python API: `pipeline.train`, `load_config`, `Result`, `evaluate`, `export`.

The CLI (`pipeline/__main__.py`) is a thin layer over these functions. Errors are exceptions, never an
exit: `ConfigError` (the CLI's exit 2: nothing started), `TrainingFailed` (exit 1), `Preempted`
(exit 75: a checkpoint is committed; train again with the same config to resume).

    import pipeline

    result = pipeline.train("configs/smoke.yaml", train={"max_steps": 50}, run_dir="runs/try")
    print(result.metrics["eval/accuracy"], result.best, result.checkpoint)
    same = pipeline.Result.from_path("runs/try")  # == result, read back from the run dir's files

This module imports only the config layer when it is imported; training, evaluation and export
import their frameworks when they are called.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pipeline import config as config_mod
from pipeline.config import Config, ConfigError

if TYPE_CHECKING:
    from pipeline.launch.plan import Plan

__all__ = ["Best", "Preempted", "Result", "evaluate", "export", "load_config", "prepare", "run", "train"]

ConfigLike = str | os.PathLike | Mapping[str, Any] | Config


class Best(NamedTuple):
    """The best value of a run's best metric over its eval rows, and the step it was logged at."""

    metric: str
    value: float
    step: int


@dataclass(frozen=True)
class Result:
    """What a run left behind, read from its run dir (so `Result.from_path(run_dir)` gives it again).

    metrics          the last value of each key over the rows of metrics.jsonl (step, time, train/...,
                     eval/...)
    metrics_history  the rows of metrics.jsonl, in order
    best             Best(metric, value, step): `checkpoint.best_metric` where you set it, else the
                     task's best metric (eval/accuracy for classify), max or min by its mode; None
                     before the first eval
    checkpoint       the last committed checkpoint: its s3:// URL once mirrored there, else its local
                     path; None if there is none
    step             the last step the run completed (its finish or preemption, else the last logged)
    preempted        the last segment stopped early on SIGTERM/SIGUSR1 with a committed checkpoint
    """

    run_dir: Path
    run_id: str | None
    config: Config
    metrics: dict[str, Any]
    metrics_history: list[dict[str, Any]] = field(repr=False)
    best: Best | None
    checkpoint: str | None
    step: int
    preempted: bool

    @classmethod
    def from_path(cls, run_dir: str | os.PathLike) -> Result:
        """The Result of a finished or interrupted run: from its config.yaml, metrics.jsonl,
        events.jsonl and checkpoint store. ConfigError if `run_dir` is not a run dir."""
        run_dir = Path(run_dir).resolve()
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir} is not a run dir of pipeline.train: it has no config.yaml")
        cfg = config_mod.load(run_dir / "config.yaml")
        rows = [row for row in _jsonl(run_dir / "metrics.jsonl") if "step" in row]
        events = _jsonl(run_dir / "events.jsonl")
        segment = _last_segment(events)
        start = segment[0] if segment and segment[0].get("event") == "start" else {}
        metrics: dict[str, Any] = {}
        for row in rows:
            metrics.update(row)
        return cls(
            run_dir=run_dir,
            run_id=start.get("run_id"),
            config=cfg,
            metrics=metrics,
            metrics_history=rows,
            best=_best(cfg, rows),
            checkpoint=_last_checkpoint(cfg),
            step=_last_step(segment, rows),
            preempted=any(e.get("event") == "preempted" for e in segment),
        )


class Preempted(Exception):
    """SIGTERM/SIGUSR1 stopped the run after committing a checkpoint (the CLI's exit 75): train again
    with the same config (run dir) to resume from it. `.result` is the run's Result so far."""

    def __init__(self, result: Result) -> None:
        super().__init__(
            f"preempted: checkpoint committed at step {result.step} ({result.checkpoint}); "
            "train again with the same config to resume"
        )
        self.result = result


def load_config(config: ConfigLike, overrides: Sequence[str] | Mapping[str, Any] | None = None) -> Config:
    """A validated Config from a YAML path, a dict (YAML-shaped) or a Config, with `overrides`: dotted
    `key=value` strings as on the command line (`["optim.lr=3e-4"]`), or a dict, nested
    (`{"train": {"max_steps": 50}}`: merged into the section) or dotted (`{"train.max_steps": 50}`).
    Unknown keys and wrong types raise ConfigError naming the key (with a did-you-mean)."""
    if isinstance(overrides, str):
        overrides = [overrides]
    if isinstance(config, str | os.PathLike) and not isinstance(overrides, Mapping):
        return config_mod.load(config, list(overrides or []))  # the CLI's own path and messages
    if isinstance(config, Config):
        base, source = config.to_dict(), "Config"
    elif isinstance(config, Mapping):
        base, source = dict(config), "dict"
    elif isinstance(config, str | os.PathLike):
        base, source = config_mod.read_yaml(config), str(Path(config))
    else:
        kind = type(config).__name__
        raise ConfigError(f"a config is a YAML path, a dict or a pipeline Config, not a {kind}")
    tree = base
    if isinstance(overrides, Mapping):
        tree = config_mod.apply_overrides(tree, overrides)
    else:
        for text in overrides or []:
            key, value = config_mod.parse_override(text)
            tree = config_mod.apply_overrides(tree, {key: value}, f"override '{text}'")
    return config_mod.validate_tree(tree, f"{source} + overrides" if overrides else source)


def prepare(cfg: Config) -> Plan:
    """The preflight: data resolved, model and task built and checked, resume point chosen, users'
    code imported. Nothing is started or written. ConfigError on any problem."""
    from pipeline.launch.plan import make_plan

    return make_plan(cfg)


def run(plan: Plan) -> Result:
    """Train a prepared run to its end: `train` after `prepare` (the CLI prints the plan in between).
    Raises TrainingFailed, Preempted or ConfigError."""
    from pipeline import launch

    final = launch.train(plan)
    result = Result.from_path(plan.cfg.resolved_run_dir)
    if final.get("preempted"):
        raise Preempted(result)
    return result


def train(config: ConfigLike, /, **overrides: Any) -> Result:
    """Train as `pipeline train` does: `config` is a YAML path, a dict or a Config; `overrides` are
    sections or keys deep-merged over it (`train={"max_steps": 50}`, `run_dir="runs/x"`). Returns the
    run's Result (equal to `Result.from_path(run_dir)`); raises ConfigError (nothing started),
    TrainingFailed, or Preempted (a checkpoint is committed: train again to resume). Re-running on
    the same run dir resumes from its newest verified checkpoint (`resume=auto`)."""
    return run(prepare(load_config(config, overrides)))


def evaluate(
    target: str | os.PathLike, overrides: Sequence[str] | Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """`pipeline eval`: the task's metrics of a checkpoint (or a run dir's newest) on the val shards
    of its run's config (config.yaml beside it; `overrides` over it, e.g. {"data.val": DIR}), in one
    process without DeepSpeed. {"checkpoint", "step", "eval/...": ...}. An environment task's are
    env.eval_episodes episodes of its deterministic policy (e.g. {"env.eval_episodes": 50}), seeded by
    episode index as the run's own evaluation: eval/return, eval/return_std, eval/length, eval/episodes."""
    from pipeline.training.evaluator import evaluate_checkpoint, find_checkpoint

    ckpt = find_checkpoint(Path(target))
    cfg = load_config(ckpt.parent.parent / "config.yaml", overrides)
    # one local process; the run's resume/init_from settings do not matter for scoring
    cfg = load_config(
        cfg,
        {
            "cluster.num_workers": 1,
            "data.num_workers": 0,
            "resume": "auto",
            "init_from.path": None,
        },
    )
    return evaluate_checkpoint(cfg, prepare(cfg).spec, ckpt)


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, engine: str = "model") -> dict[str, Any]:
    """`pipeline export`: consolidated fp32 weights of one engine of a checkpoint (or a run dir's newest)
    as a torch state_dict at `out` (+ `out`.json metadata), loadable into the plain nn.Module without
    DeepSpeed; for an environment task also `out`.policy.pt2, its deterministic policy as a torch.export
    program (pipeline.checkpoint.policy). Returns the metadata: {"checkpoint", "step", "engine",
    "model", "data", ...; "policy": {"file", "input", "output", "env", ...} for an environment task}."""
    from pipeline.checkpoint import commit
    from pipeline.checkpoint import export as export_mod

    ckpt = commit.find(Path(checkpoint))
    if ckpt is None:
        raise commit.CheckpointError(f"{checkpoint} is neither a checkpoint nor a run dir with one")
    return export_mod.export(ckpt, Path(out), engine)


def generate(
    target: str | os.PathLike,
    prompt: str,
    *,
    tokens: int = 200,
    temperature: float | None = None,
    top_k: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """`pipeline generate`: a language model's continuation of `prompt` from a checkpoint (or a run
    dir's newest), without DeepSpeed, in fp32; the same for the same checkpoint, arguments and seed.
    temperature/top_k default to the run's task.args. {"continuation", "checkpoint", "step", ...}."""
    from pipeline.training.evaluator import find_checkpoint
    from pipeline.training.sampling import generate_from_checkpoint

    return generate_from_checkpoint(
        find_checkpoint(Path(target)),
        prompt=prompt,
        tokens=tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
    )


# --- reading a run dir -------------------------------------------------------------------------------


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line of a process killed mid-write
    return rows


def _last_segment(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events since the last start (a restart, re-run or requeue starts a new segment)."""
    starts = [i for i, e in enumerate(events) if e.get("event") == "start"]
    return events[starts[-1] :] if starts else events


def _last_step(segment: list[dict[str, Any]], rows: list[dict[str, Any]]) -> int:
    for event in reversed(segment):
        if event.get("event") in ("finish", "preempted") and isinstance(event.get("step"), int):
            return event["step"]
    steps = [r["step"] for r in rows] + [
        e["step"] for e in segment if e.get("event") == "checkpoint_commit" and isinstance(e.get("step"), int)
    ]
    return max(steps, default=0)


def _task_best(cfg: Config) -> tuple[str, str] | None:
    """(metric, mode) the run ranked by: `checkpoint.best_metric`/`best_mode` over the task class's own
    (tasks.best_of); None if the task cannot be imported here."""
    from pipeline import tasks

    try:
        cls = tasks.task_class(cfg.task.name)
    except ConfigError:
        return None
    return tasks.best_of(cls, cfg.checkpoint.best_metric, cfg.checkpoint.best_mode)


def _best_candidates(cfg: Config) -> Iterator[tuple[str, str]]:
    """(metric, mode) pairs in order of preference: the run's best metric (`checkpoint.best_metric`
    where it was set, else the task's), then the configured one alone (a task not importable here)."""
    task_best = _task_best(cfg)  # imports the task's module (torch) only when needed
    if task_best is not None:
        yield task_best
    if cfg.checkpoint.best_metric:
        yield cfg.checkpoint.best_metric, cfg.checkpoint.best_mode or "max"


def _best(cfg: Config, rows: list[dict[str, Any]]) -> Best | None:
    """The best value of the run's best metric over the rows that logged it (the earlier row wins a
    tie, as the run's own bookkeeping does); None if no row logged any candidate metric."""
    for metric, mode in _best_candidates(cfg):
        scored = [(row[metric], row["step"]) for row in rows if isinstance(row.get(metric), int | float)]
        if not scored:
            continue
        best = scored[0]
        for value, step in scored[1:]:
            if value > best[0] if mode == "max" else value < best[0]:
                best = (value, step)
        return Best(metric, float(best[0]), int(best[1]))
    return None


def _last_checkpoint(cfg: Config) -> str | None:
    """The newest commit in the run's checkpoint store: its remote URL once uploaded, else its local
    path (as the run's own summary names it)."""
    from pipeline.checkpoint import commit, store

    where = store.for_config(cfg)
    local = {c.name: c for c in commit.committed(where.local)}
    remote: set[str] = set()
    if where.remote is not None:
        try:
            remote = set(where.remote.committed())
        except commit.CheckpointError as e:  # a finished run is not failed over a listing: say so
            print(f"warning: {e}; naming the newest local checkpoint instead", file=sys.stderr)
    names = sorted(set(local) | remote)
    if not names:
        return None
    newest = names[-1]
    if newest in remote:
        assert where.remote is not None
        return f"{where.remote.url}/{newest}"
    return str(local[newest])
