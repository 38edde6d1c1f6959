"""The `sweep` section of a sweep file: the search space over config keys, the metric, the trials, the
search and the early-stopping scheduler, validated once (errors name `sweep.<key>`: exit 2).

    sweep:
      metric: eval/accuracy        # default: the task's best metric (checkpoint.best_metric, else its own)
      mode: max                    # default: the task's mode for its own metric, else max
      parameters:                  # config keys (dotted, as overrides): one domain each
        optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
        model.args.dropout: {choice: [0.0, 0.1, 0.3]}
      num_trials: 6                # random/optuna: trials to run; grid: every combination, once
      max_concurrent: 2            # trials at once (each trial's workers come from its own config)
      search: random               # grid | random | optuna (TPE, batches of max_concurrent)
      scheduler: {asha: {grace_steps: 100}}   # or none: every trial runs to train.max_steps
      seed: 0                      # the random draws (and TPE's sampler)

Domains: `choice: [values]`, `grid: [values]` (search: grid only), `uniform: [low, high]`,
`loguniform: [low, high]` (0 < low), `randint: [low, high]` (low <= n < high, as Python's
range). Random and grid trials are drawn here, from `seed`, not by the search library: a re-run of the
same sweep draws the same trials, so an interrupted sweep can continue its own (optuna's are asked by
launch/optuna_search.py as the sweep runs, and kept in sweep.json).
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.config import ConfigError

DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint")
MAX_TRIALS = 10_000


class Asha(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_steps: int = Field(100, gt=0, description="steps every trial trains before it can be stopped")
    reduction_factor: int = Field(3, ge=2, description="keep the best 1/reduction_factor at each rung")


class Scheduler(BaseModel):
    model_config = ConfigDict(extra="forbid")
    asha: Asha | None = None


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: str | None = None
    mode: Literal["max", "min"] | None = None
    parameters: dict[str, dict[str, Any]]
    num_trials: int | None = Field(None, gt=0, le=MAX_TRIALS)
    max_concurrent: int = Field(1, gt=0, le=1000)
    search: Literal["grid", "random", "optuna"] = "random"
    scheduler: Scheduler | None = None
    seed: int = 0

    @field_validator("parameters")
    @classmethod
    def _domains(cls, parameters: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not parameters:
            raise ValueError(
                "needs at least one config key to search over, e.g. optim.lr: {loguniform: [1e-4, 1e-2]}"
            )
        for key, domain in parameters.items():
            check_domain(key, domain)
        return parameters

    @model_validator(mode="after")
    def _search_fits_domains(self) -> SweepSpec:
        kinds = {key: next(iter(domain)) for key, domain in self.parameters.items()}
        if self.search == "grid":
            if drawn := [k for k, kind in kinds.items() if kind not in ("grid", "choice")]:
                raise ValueError(
                    f"sweep.search grid runs every combination of listed values; parameter '{drawn[0]}' "
                    f"is {kinds[drawn[0]]}: give it a list (grid: [...]) or use search: random"
                )
            if self.num_trials is not None and self.num_trials != self.grid_size():
                raise ValueError(
                    f"sweep.num_trials {self.num_trials}: a grid search runs every combination once "
                    f"({self.grid_size()}); leave num_trials out"
                )
        else:
            if listed := [k for k, kind in kinds.items() if kind == "grid"]:
                raise ValueError(
                    f"sweep.parameters.{listed[0]}: grid values need search: grid; with search "
                    f"{self.search} use choice: [...]"
                )
            if self.num_trials is None:
                raise ValueError(f"sweep.num_trials: how many trials the {self.search} search runs, e.g. 6")
        return self

    def grid_size(self) -> int:
        return math.prod(len(next(iter(d.values()))) for d in self.parameters.values())

    @property
    def trials(self) -> int:
        return self.grid_size() if self.search == "grid" else int(self.num_trials or 0)


def check_domain(key: str, domain: Any) -> None:
    """ValueError naming sweep.parameters.KEY when `domain` is not one well-formed domain."""
    where = f"sweep.parameters.{key}"
    if not isinstance(domain, dict) or len(domain) != 1 or next(iter(domain)) not in DOMAINS:
        raise ValueError(
            f"{where}: one domain, {{choice|grid|uniform|loguniform|randint: ...}}, got {domain!r}"
        )
    kind, values = next(iter(domain.items()))
    if kind in ("choice", "grid"):
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}: {kind} needs a non-empty list of values, got {values!r}")
        return
    numbers = isinstance(values, list) and len(values) == 2
    numbers = numbers and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if not numbers or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{where}: {kind} needs [low, high] (two finite numbers), got {values!r}")
    low, high = values
    if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        raise ValueError(f"{where}: randint needs two integers [low, high), got {values!r}")
    if not low < high:
        raise ValueError(f"{where}: {kind} [{low}, {high}] is empty: low must be below high")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"{where}: loguniform [{low}, {high}] needs 0 < low (it draws log-uniformly)")


def read_spec(path: str) -> SweepSpec:
    """The sweep file at `path`, validated. ConfigError naming the file or the key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file not found: {p}")
    try:
        tree = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"sweep file {p} is not YAML text: {e}") from None
    return load_spec(path, tree)


def load_spec(path: str, tree: Any) -> SweepSpec:
    """The `sweep` section of the sweep file `path` (parsed to `tree`). ConfigError naming the key."""
    if not isinstance(tree, dict) or set(tree) != {"sweep"}:
        found = ", ".join(map(str, tree)) if isinstance(tree, dict) else type(tree).__name__
        raise ConfigError(f"sweep file {path}: needs one top-level section 'sweep' (found: {found})")
    try:
        return SweepSpec.model_validate(tree["sweep"])
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            lines.append(message if message.startswith("sweep.") else f"sweep.{key}: {message}")
        raise ConfigError(f"invalid sweep file {path}:\n  " + "\n  ".join(lines)) from None


def draw_trials(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every trial's {config key: value}, in trial order. Grid: the combinations (the first key varies
    slowest); random: independent draws from `spec.seed`. For optuna, the same random draws check the
    space before the sweep starts; its trials are asked as it runs (sweep.ask_trials)."""
    keys = list(spec.parameters)
    if spec.search == "grid":
        lists = [next(iter(spec.parameters[k].values())) for k in keys]
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*lists)]
    rng = random.Random(spec.seed)
    return [{k: draw(spec.parameters[k], rng) for k in keys} for _ in range(spec.trials)]


def draw(domain: dict[str, Any], rng: random.Random) -> Any:
    kind, values = next(iter(domain.items()))
    if kind in ("choice", "grid"):
        return rng.choice(values)
    low, high = values
    if kind == "uniform":
        return rng.uniform(low, high)
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.randrange(low, high)


def trial_overrides(params: dict[str, Any]) -> list[str]:
    """Dotted overrides of a trial's parameters, as `pipeline train` takes them (YAML values)."""
    return [f"{key}={yaml_value(value)}" for key, value in params.items()]


def yaml_value(value: Any) -> str:
    """`value` as YAML that parses back to it (PyYAML reads `1e-05` as a string, `1.0e-05` as a float)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).removesuffix("\n...\n").strip()
