"""`search: optuna` (issue 20): Optuna's TPE asks a sweep's trials batch by batch, told every trial
before; what it asks lies in the sweep's domains, is in sweep.json before it starts, and a continued
sweep asks on from the same history."""

import importlib.util
import json
import math
import statistics

import pytest

from pipeline.config import ConfigError
from pipeline.launch import optuna_search, sweep, sweep_spec
from tests.unit.test_sweep_spec import plan

SPACE = {
    "optim.lr": {"loguniform": [1.0e-4, 1.0e-2]},
    "model.args.hidden": {"choice": [[16], [32, 16], [64]]},  # list values: Optuna takes only scalars
    "data.batch_size": {"randint": [8, 10]},  # 8 or 9
}


def test_asked_trials_lie_in_the_domains_and_the_same_history_asks_the_same():
    history = [({"optim.lr": 1e-3, "model.args.hidden": [32, 16], "data.batch_size": 9}, 0.8)]
    common = {"parameters": SPACE, "mode": "max", "count": 12, "num_trials": 20, "seed": 0}
    asked = optuna_search.ask(history=history, **common)
    assert asked == optuna_search.ask(history=history, **common)
    assert all(1e-4 <= t["optim.lr"] <= 1e-2 for t in asked)
    assert {tuple(t["model.args.hidden"]) for t in asked} <= {(16,), (32, 16), (64,)}
    assert {t["data.batch_size"] for t in asked} == {8, 9}  # randint's high is exclusive, as Python's range
    assert asked != optuna_search.ask(history=[*history, (asked[0], 0.5)], **common)  # it learns


def test_tpe_told_a_history_asks_nearer_its_best_than_random_draws():
    space = {"optim.lr": {"loguniform": [1.0e-5, 1.0e-1]}}
    # accuracy peaks at lr 1e-3 (log10 -3) and falls off with the distance in decades
    decades = [-5 + 4 * i / 15 for i in range(16)]
    history = [({"optim.lr": 10.0**e}, 1.0 - abs(e + 3) / 4) for e in decades]
    history.append(({"optim.lr": 1e-2}, None))  # a failed trial: told, with no value
    asked = optuna_search.ask(parameters=space, mode="max", history=history, count=16, num_trials=40, seed=0)
    spec = sweep_spec.load_spec("s", {"sweep": {"parameters": space, "num_trials": 16}})

    def off(trials):  # the median distance from the best lr, in decades
        return statistics.median(abs(math.log10(t["optim.lr"]) + 3) for t in trials)

    # measured: 0.47 against 0.83 (seeds 0-7: ratios 0.44-0.68)
    assert off(asked) < 0.75 * off(sweep_spec.draw_trials(spec))


def test_an_optuna_sweep_asks_batches_and_continues_them(tmp_path, digits_dir):
    section = {"parameters": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}, "num_trials": 5, "max_concurrent": 2}
    section["search"] = "optuna"
    planned = plan(tmp_path, digits_dir, section)
    assert planned.trials == []  # nothing asked before the sweep runs
    first = sweep.ask_trials(planned)
    assert [t.id for t in first] == ["trial_0000", "trial_0001"]
    state = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [t["params"] for t in state["trials"]] == [t.params for t in first]  # kept before they start
    for trial, value in zip(first, (0.7, 0.8), strict=True):
        trial.status, trial.metric = "done", value
    planned.save()

    again = plan(tmp_path, digits_dir, section)  # the driver killed and re-run: the same trials
    assert [(t.id, t.params, t.metric) for t in again.trials] == [(t.id, t.params, t.metric) for t in first]
    assert [t.id for t in sweep.ask_trials(again)] == ["trial_0002", "trial_0003"]
    assert [t.id for t in sweep.ask_trials(again)] == ["trial_0004"]  # num_trials 5 in all
    assert sweep.ask_trials(again) == []
    assert len(plan(tmp_path, digits_dir, {**section, "max_concurrent": 1}).trials) == 5  # may change
    other = {**section, "parameters": {"optim.lr": {"loguniform": [1e-3, 1e-1]}}}
    with pytest.raises(ConfigError, match=r"holds another sweep"):
        plan(tmp_path, digits_dir, other)


def test_without_optuna_installed_the_sweep_is_refused_naming_the_extra(tmp_path, digits_dir, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else find_spec(name, *a)
    )
    section = {"parameters": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}, "num_trials": 2, "search": "optuna"}
    with pytest.raises(
        ConfigError, match=r"sweep.search: optuna needs the optuna package.*pipeline\[optuna\]"
    ):
        plan(tmp_path, digits_dir, section)
