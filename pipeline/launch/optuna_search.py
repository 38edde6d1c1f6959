"""`search: optuna`: a sweep's next trials from Optuna's TPE, told every trial that ended so far. The only
optuna import (an optional package: `pip install 'pipeline[optuna]'`).

The sweep asks in batches of up to `max_concurrent` trials; a batch runs to its end (or ASHA's stop)
before the next is asked, so each batch learns from every trial before it. The study is never stored:
it is rebuilt from sweep.json (each trial's parameters and best metric) whenever trials are asked, and
every asked trial is in sweep.json before it starts, so an interrupted sweep continues the same trials
and asks on from the same history. Written on Optuna's ask-and-tell API rather than Tune's OptunaSearch
because Tune's searcher keeps its own state (pickled beside the experiment), which is not what a
continued sweep reads: sweep.json is.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

# TPE draws at random until it has this many trials to model (Optuna's default is 10, more than a
# small sweep has): a third of the sweep's trials, at least 2, at most Optuna's 10.
MAX_STARTUP_TRIALS = 10


def distributions(parameters: dict[str, dict[str, Any]]) -> dict[str, BaseDistribution]:
    """Optuna's distribution of each sweep domain. `choice` is categorical over the values' indices:
    Optuna takes only None/bool/int/float/str choices, a config value may be a list (e.g. widths)."""
    out: dict[str, BaseDistribution] = {}
    for key, domain in parameters.items():
        kind, values = next(iter(domain.items()))
        if kind in ("choice", "grid"):  # grid is refused with search: optuna (sweep_spec)
            out[key] = CategoricalDistribution(list(range(len(values))))
        elif kind == "randint":  # [low, high), as Python's range; Optuna's high is inclusive
            out[key] = IntDistribution(values[0], values[1] - 1)
        else:
            out[key] = FloatDistribution(values[0], values[1], log=kind == "loguniform")
    return out


def _encoded(parameters: dict[str, dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    """A trial's parameters as Optuna sees them (a choice by its index)."""
    out = {}
    for key, value in params.items():
        kind, values = next(iter(parameters[key].items()))
        out[key] = values.index(value) if kind in ("choice", "grid") else value
    return out


def _decoded(parameters: dict[str, dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        kind, values = next(iter(parameters[key].items()))
        out[key] = values[value] if kind in ("choice", "grid") else value
    return out


def ask(
    *,
    parameters: dict[str, dict[str, Any]],
    mode: str,
    history: list[tuple[dict[str, Any], float | None]],
    count: int,
    num_trials: int,
    seed: int,
) -> list[dict[str, Any]]:
    """`count` new trials' parameters, TPE told `history` (each ended trial's parameters and best metric;
    None: it failed or never evaluated). Seeded by `seed` and the history's length: the same history
    asks the same trials."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" per batch
    dists = distributions(parameters)
    startup = min(MAX_STARTUP_TRIALS, max(2, num_trials // 3))
    sampler = optuna.samplers.TPESampler(seed=seed + len(history), n_startup_trials=startup)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize", sampler=sampler)
    for params, value in history:
        state = TrialState.COMPLETE if value is not None else TrialState.FAIL
        study.add_trial(
            optuna.trial.create_trial(
                params=_encoded(parameters, params), distributions=dists, value=value, state=state
            )
        )
    return [_decoded(parameters, study.ask(dists).params) for _ in range(count)]
