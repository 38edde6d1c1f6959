"""`pipeline sweep CONFIG SWEEP.yaml`: many pipeline runs over a search space, scheduled by Ray Tune
(launch/tune.py), kept in the sweep's directory so that an interrupted sweep continues.

The sweep dir is the config's `run_dir`. It holds

    sweep.json           the sweep file's section, the config and overrides, and every trial: its
                         parameters, status (pending, running, done, stopped, failed), step, metric
    trial_0000/ ...      each trial's run dir: a normal pipeline run (config.yaml, metrics.jsonl,
                         events.jsonl, checkpoints/), resumed from its checkpoints like any run
    results.md           the trials sorted by the metric (written at the end)
    best.yaml            the best trial's resolved config: `pipeline train best.yaml` trains it again

Re-running the same command continues: done and stopped trials are kept, running ones resume from
their last checkpoint, pending ones start. Random and grid trials are drawn from the sweep's seed
(sweep_spec.draw_trials), so the re-run finds the same trials; optuna's are asked batch by batch
(ask_trials) and kept in sweep.json before they start. Another sweep in the same dir is refused (exit 2).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline import config as config_mod
from pipeline import secrets, tasks
from pipeline.config import Config, ConfigError
from pipeline.launch import sweep_spec
from pipeline.launch.plan import make_plan
from pipeline.launch.sweep_spec import SweepSpec

STATE = "sweep.json"
FINISHED = ("done", "stopped")  # not run again when the sweep continues


@dataclass
class Trial:
    id: str  # trial_0000: its run dir's name under the sweep dir
    params: dict[str, Any]
    status: str = "pending"
    step: int = 0
    metric: float | None = None  # the best value of the sweep's metric so far

    def overrides(self) -> list[str]:
        return sweep_spec.trial_overrides(self.params)


@dataclass
class Sweep:
    config_path: str
    overrides: list[str]
    spec: SweepSpec
    cfg: Config  # the base config (the sweep dir is its run_dir)
    metric: str
    mode: str
    trials: list[Trial] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return self.cfg.resolved_run_dir

    @property
    def name(self) -> str:
        return self.cfg.name

    def trial_config(self, trial: Trial) -> Config:
        """The trial's pipeline config: the base config, its parameters, its run dir under the sweep
        dir, and its W&B run grouped by the sweep (one group) and tagged with its parameters."""
        tags = [
            *self.cfg.tracking.wandb.tags,
            *(f"{k}={sweep_spec.yaml_value(v)}" for k, v in trial.params.items()),
        ]
        extra = [
            f"run_dir={self.dir / trial.id}",
            f"name={self.name}-{trial.id}",
            f"tracking.wandb.group={self.cfg.tracking.wandb.group or self.name}",
            f"tracking.wandb.tags={sweep_spec.yaml_value(tags)}",
            "resume=auto",
        ]
        return config_mod.load(self.config_path, [*self.overrides, *trial.overrides(), *extra])

    def save(self) -> None:
        """sweep.json, replaced atomically (a driver killed mid-write leaves the old one)."""
        state = {
            "name": self.name,
            "config": self.config_path,
            "overrides": self.overrides,
            "sweep": self.spec.model_dump(exclude_none=True),
            "metric": self.metric,
            "mode": self.mode,
            "trials": [asdict(t) for t in self.trials],
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{STATE}.tmp"
        secrets.write_private(tmp, json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.dir / STATE)

    def better(self, a: float | None, b: float | None) -> bool:
        """Whether metric value `a` beats `b` (None never does)."""
        if a is None:
            return False
        return b is None or (a > b if self.mode == "max" else a < b)

    def ranked(self) -> list[Trial]:
        """Trials with a metric, best first, then the rest in trial order."""
        scored = [t for t in self.trials if t.metric is not None]
        scored.sort(key=lambda t: t.metric if self.mode == "min" else -t.metric)
        return scored + [t for t in self.trials if t.metric is None]


def plan_sweep(config_path: str, sweep_path: str, overrides: list[str]) -> Sweep:
    """The sweep and its trials, every trial's config planned as `pipeline train` plans it: bad keys,
    ranges and metrics are ConfigError (exit 2) before any trial starts. Continues the sweep dir's own
    trials when it holds this sweep."""
    cfg = config_mod.load(config_path, overrides)
    spec = sweep_spec.read_spec(sweep_path)
    if spec.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError(
            "sweep.search: optuna needs the optuna package: pip install 'pipeline[optuna]' "
            "(or use search: random)"
        )
    metric, mode = _metric(cfg, spec)
    sweep = Sweep(
        config_path=str(Path(config_path).resolve()),
        overrides=list(overrides),
        spec=spec,
        cfg=cfg,
        metric=metric,
        mode=mode,
    )
    if spec.scheduler and spec.scheduler.asha:
        _check_asha(cfg, spec)
    # optuna's trials are asked batch by batch (ask_trials); its space is checked on seeded draws
    drawn = [Trial(id=_trial_id(i), params=p) for i, p in enumerate(sweep_spec.draw_trials(spec))]
    for trial in drawn:  # every trial as `pipeline train` would check it: keys, types, model, data
        try:
            make_plan(sweep.trial_config(trial))
        except ConfigError as e:
            raise ConfigError(f"sweep trial {trial.id} ({', '.join(trial.overrides())}): {e}") from None
    sweep.trials = _continue(sweep, [] if spec.search == "optuna" else drawn)
    return sweep


def _trial_id(index: int) -> str:
    return f"trial_{index:04d}"


def ask_trials(sweep: Sweep) -> list[Trial]:
    """search: optuna: the next batch (up to max_concurrent, up to num_trials in all) from TPE told every
    trial so far, added to sweep.json before any starts; [] when the sweep has all its trials, and for
    random and grid sweeps (drawn at the start)."""
    spec = sweep.spec
    count = min(spec.max_concurrent, spec.trials - len(sweep.trials))
    if spec.search != "optuna" or count <= 0:
        return []
    from pipeline.launch import optuna_search

    history = [(t.params, t.metric) for t in sweep.trials]
    asked = optuna_search.ask(
        parameters=spec.parameters,
        mode=sweep.mode,
        history=history,
        count=count,
        num_trials=spec.trials,
        seed=spec.seed,
    )
    new = [Trial(id=_trial_id(len(sweep.trials) + i), params=p) for i, p in enumerate(asked)]
    sweep.trials.extend(new)
    sweep.save()
    return new


def _metric(cfg: Config, spec: SweepSpec) -> tuple[str, str]:
    """The metric and mode trials are ranked by: the sweep's, else the run's best metric (its
    checkpoint.best_metric, else the task's own). A metric the task never logs is a ConfigError."""
    task = tasks.build(cfg.task.name, cfg.task.args)
    metric, mode = tasks.best_of(
        task, spec.metric or cfg.checkpoint.best_metric, spec.mode or cfg.checkpoint.best_mode
    )
    logged = tasks.eval_metric_names(task, scored=bool(cfg.task.score_classifier))
    if logged is not None and metric not in logged:
        raise ConfigError(
            f"sweep.metric: task '{cfg.task.name}' never logs {metric}; it logs {', '.join(logged)}"
        )
    return metric, mode


def _check_asha(cfg: Config, spec: SweepSpec) -> None:
    """ASHA compares trials at their evaluations: they must evaluate, before the last step."""
    grace = spec.scheduler.asha.grace_steps
    if not cfg.train.eval_every:
        raise ConfigError(
            "sweep.scheduler.asha: trials report the metric at each evaluation and train.eval_every is 0 "
            f"(only at the end): set train.eval_every, e.g. {max(1, grace // 2)}"
        )
    if grace >= cfg.train.max_steps:
        raise ConfigError(
            f"sweep.scheduler.asha.grace_steps {grace} >= train.max_steps {cfg.train.max_steps}: no trial "
            "could be stopped early; lower it (e.g. a quarter of max_steps) or drop the scheduler"
        )


def _continue(sweep: Sweep, drawn: list[Trial]) -> list[Trial]:
    """The trials to run: the sweep dir's own where it holds this sweep, else the drawn ones. Another
    sweep's dir is refused (its trials would be mixed with these)."""
    path = sweep.dir / STATE
    if not path.is_file():
        return drawn
    try:
        saved = json.loads(path.read_text())
        trials = [Trial(**t) for t in saved["trials"]]
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(
            f"{path} is not a sweep's state ({e}): move it away or choose another run_dir"
        ) from None
    # the same trials and metric: max_concurrent and the scheduler may change when a sweep continues.
    # optuna's trials were asked from the space: the same space and search, then.
    if sweep.spec.search == "optuna":
        space = saved.get("sweep", {})
        same = space.get("search") == "optuna" and space.get("parameters") == sweep.spec.parameters
    else:
        same = [(t.id, t.params) for t in trials] == [(t.id, t.params) for t in drawn]
    if not same or saved.get("metric") != sweep.metric:
        raise ConfigError(
            f"run_dir {sweep.dir} holds another sweep (its {STATE} has other trials or another "
            "metric): give this one another run_dir (e.g. name=...), or delete that dir to start over"
        )
    return trials


def describe(sweep: Sweep) -> str:
    """The dry run's and the start's summary: what will run where."""
    spec = sweep.spec
    finished = [t for t in sweep.trials if t.status in FINISHED]
    scheduler = (
        f"ASHA (grace {spec.scheduler.asha.grace_steps} steps)"
        if spec.scheduler and spec.scheduler.asha
        else "none"
    )
    lines = [
        f"sweep dir     {sweep.dir}",
        f"search        {spec.search}, {len(sweep.trials)} of {spec.trials} trials drawn ({len(finished)} "
        "finished), "
        f"{spec.max_concurrent} at once; early stopping: {scheduler}",
        f"metric        {sweep.metric} ({sweep.mode})",
        "parameters    " + "; ".join(f"{k}: {v}" for k, v in spec.parameters.items()),
    ]
    lines += [f"  {t.id}  {t.status:8} {' '.join(t.overrides())}" for t in sweep.trials]
    return "\n".join(lines)


def results_table(sweep: Sweep) -> str:
    """The trials, best first: a Markdown table (results.md, and the console at the end)."""
    keys = list(sweep.spec.parameters)
    head = ["rank", "trial", "status", "step", sweep.metric, *keys]
    rows = []
    for rank, trial in enumerate(sweep.ranked(), start=1):
        value = "" if trial.metric is None else f"{trial.metric:.4f}"
        params = [_short(trial.params[k]) for k in keys]
        rows.append([str(rank), trial.id, trial.status, str(trial.step), value, *params])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else sweep_spec.yaml_value(value)


def write_results(sweep: Sweep) -> Path | None:
    """results.md and best.yaml (the best trial's resolved config) in the sweep dir; returns best.yaml's
    path, or None when no trial has the metric."""
    secrets.write_private(
        sweep.dir / "results.md",
        f"# sweep {sweep.name}: {sweep.metric} ({sweep.mode})\n\n{results_table(sweep)}\n",
    )
    best = next((t for t in sweep.ranked() if t.metric is not None), None)
    if best is None:
        return None
    cfg = sweep.trial_config(best)
    # the best config trains as a run of its own, not into the trial's dir
    cfg = cfg.model_copy(update={"run_dir": str(sweep.dir / "best"), "name": f"{sweep.name}-best"})
    path = sweep.dir / "best.yaml"
    header = f"# the best trial of sweep {sweep.name}: {best.id}, {sweep.metric} {best.metric:.4f}\n"
    secrets.write_private(path, header + config_mod.dump_yaml(cfg))
    return path
