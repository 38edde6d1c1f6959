"""`pipeline sweep` before any trial starts (issue 20): the sweep file's domains and the trials drawn from
them, and every bad input an exit 2 naming the key: a search-space key that is not a config key (with
a did-you-mean), an impossible range, a metric the task does not report, ASHA without evaluations,
another sweep's dir."""

import json
import math
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.launch import sweep, sweep_spec
from tests.helpers import run_cli

BASE = ["train.max_steps=30", "train.eval_every=10", "optim.warmup_steps=2", "tracking.wandb.mode=disabled"]


def write(tmp_path, section, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"sweep": section}, sort_keys=False))
    return str(path)


def plan(tmp_path, digits_dir, section, *extra):
    overrides = [f"data.train={digits_dir}", f"run_dir={tmp_path / 'sweep'}", *BASE, *extra]
    return sweep.plan_sweep("configs/smoke.yaml", write(tmp_path, section), overrides)


SPACE = {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}, "model.args.dropout": {"choice": [0.0, 0.1, 0.3]}}


def test_random_draws_are_seeded_in_range_and_grids_are_every_combination():
    spec = sweep_spec.load_spec("s", {"sweep": {"parameters": SPACE, "num_trials": 50, "seed": 3}})
    trials = sweep_spec.draw_trials(spec)
    assert trials == sweep_spec.draw_trials(spec) and len(trials) == 50  # a re-run draws the same
    assert all(1e-4 <= t["optim.lr"] <= 1e-2 and t["model.args.dropout"] in (0.0, 0.1, 0.3) for t in trials)
    logs = sorted(math.log10(t["optim.lr"]) for t in trials)
    assert logs[0] < -3.5 and logs[-1] > -2.5  # log-uniform: both decades drawn
    grid = sweep_spec.load_spec(
        "s",
        {
            "sweep": {
                "parameters": {"a": {"grid": [1, 2]}, "b": {"choice": ["x", "y", "z"]}},
                "search": "grid",
            }
        },
    )
    assert sweep_spec.draw_trials(grid) == [{"a": a, "b": b} for a in (1, 2) for b in "xyz"]
    assert sweep_spec.trial_overrides({"optim.lr": 1e-05, "model.args.dropout": 0.1}) == [
        "optim.lr=1.0e-05",  # parses back to a float (PyYAML reads 1e-05 as a string)
        "model.args.dropout=0.1",
    ]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"parameters": {"optim.lr": {"loguniform": [0, 1]}}, "num_trials": 2},
            r"optim.lr: loguniform \[0, 1\] needs 0 < low",
        ),
        (
            {"parameters": {"optim.lr": {"uniform": [0.1, 0.01]}}, "num_trials": 2},
            r"uniform \[0.1, 0.01\] is empty",
        ),
        ({"parameters": {"optim.lr": {"normal": [0, 1]}}, "num_trials": 2}, r"one domain, \{choice\|grid"),
        ({"parameters": SPACE}, r"sweep.num_trials: how many trials the random search runs"),
        ({"parameters": SPACE, "num_trials": 2, "search": "grid"}, r"parameter 'optim.lr' is loguniform"),
        ({"parameters": SPACE, "num_trials": 2, "schedular": {}}, r"sweep.schedular: Extra inputs"),
    ],
)
def test_a_bad_sweep_file_names_the_key(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message):
        sweep_spec.read_spec(write(tmp_path, section))


def test_keys_values_metrics_and_schedules_the_runs_cannot_use_are_refused(tmp_path, digits_dir):
    with pytest.raises(
        ConfigError,
        match=r"(?s)trial_0000 \(optim.lrr=.*unknown config key 'optim.lrr'.*did you mean 'optim.lr'",
    ):
        plan(tmp_path, digits_dir, {"parameters": {"optim.lrr": {"choice": [0.1]}}, "num_trials": 1})
    with pytest.raises(ConfigError, match=r"(?s)trial_0000 \(zero.stage=4\).*config key 'zero.stage'"):
        plan(tmp_path, digits_dir, {"parameters": {"zero.stage": {"choice": [4]}}, "num_trials": 1})
    with pytest.raises(
        ConfigError, match=r"sweep.metric: task 'classify' never logs eval/bpc; it logs eval/accuracy"
    ):
        plan(tmp_path, digits_dir, {"parameters": SPACE, "num_trials": 1, "metric": "eval/bpc"})
    asha = {"parameters": SPACE, "num_trials": 1, "scheduler": {"asha": {"grace_steps": 10}}}
    with pytest.raises(ConfigError, match=r"train.eval_every is 0"):
        plan(tmp_path, digits_dir, asha, "train.eval_every=0")
    with pytest.raises(ConfigError, match=r"grace_steps 40 >= train.max_steps 30"):
        plan(tmp_path, digits_dir, {**asha, "scheduler": {"asha": {"grace_steps": 40}}})


def test_a_sweep_dir_continues_its_own_sweep_and_refuses_another(tmp_path, digits_dir):
    planned = plan(tmp_path, digits_dir, {"parameters": SPACE, "num_trials": 2})
    assert planned.metric == "eval/accuracy" and planned.mode == "max"  # the task's best metric
    planned.trials[0].status, planned.trials[0].metric = "done", 0.9
    planned.save()
    again = plan(tmp_path, digits_dir, {"parameters": SPACE, "num_trials": 2})
    assert [(t.status, t.metric) for t in again.trials] == [("done", 0.9), ("pending", None)]
    with pytest.raises(ConfigError, match=r"holds another sweep.*another run_dir"):
        plan(tmp_path, digits_dir, {"parameters": SPACE, "num_trials": 2, "seed": 1})
    state = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [t["id"] for t in state["trials"]] == ["trial_0000", "trial_0001"]


def test_the_cli_exits_2_before_anything_starts(tmp_path, digits_dir):
    sweep_file = write(tmp_path, {"parameters": {"optim.lrr": {"choice": [0.1]}}, "num_trials": 1})
    run_dir = tmp_path / "sweep"
    proc = run_cli(
        "sweep", "configs/smoke.yaml", sweep_file, f"data.train={digits_dir}", f"run_dir={run_dir}"
    )
    assert proc.returncode == 2 and "did you mean 'optim.lr'" in proc.stderr
    assert not run_dir.exists()
    good = write(tmp_path, {"parameters": SPACE, "num_trials": 2}, "good.yaml")
    dry = run_cli(
        "sweep", "configs/smoke.yaml", good, f"data.train={digits_dir}", f"run_dir={run_dir}", "--dry-run"
    )
    assert dry.returncode == 0, dry.stderr
    assert "trial_0001  pending  optim.lr=" in dry.stdout and not run_dir.exists()


def test_the_shipped_sweep_file_plans_against_the_cnn_recipe(tmp_path, digits_dir):
    planned = sweep.plan_sweep(
        "configs/cnn-mnist5k.yaml",
        "configs/sweeps/cnn-lr-dropout.yaml",
        [f"data.train={digits_dir}", f"run_dir={tmp_path / 'sweep'}", "train.eval_every=50"],
    )
    assert len(planned.trials) == 6 and planned.spec.max_concurrent == 2
    assert "pipeline sweep configs/cnn-mnist5k.yaml configs/sweeps/cnn-lr-dropout.yaml" in (
        Path("configs/sweeps/cnn-lr-dropout.yaml").read_text()
    )


def test_a_trial_whose_run_was_preempted_stays_to_be_continued(tmp_path):
    from pipeline.launch import tune

    run_dir = tmp_path / "trial_0000"
    run_dir.mkdir()
    assert not tune._preempted(run_dir)  # never started
    finish = {"event": "finish", "step": 40, "samples_skipped": 0}
    (run_dir / "events.jsonl").write_text(json.dumps({**finish, "preempted": True}) + "\n")
    assert tune._preempted(run_dir)
    with open(run_dir / "events.jsonl", "a") as f:  # resumed later and finished
        f.write(json.dumps({"event": "resume", "from_step": 40}) + "\n")
        f.write(json.dumps({**finish, "step": 60, "preempted": False}) + "\n")
    assert not tune._preempted(run_dir)


def test_submit_slurm_runs_a_checked_sweep_in_the_job(tmp_path, digits_dir):
    from pipeline import config
    from pipeline.launch import slurm

    good = write(tmp_path, {"parameters": SPACE, "num_trials": 2}, "good.yaml")
    run_dir = tmp_path / "sweep"
    common = ["submit", "slurm", "configs/smoke.yaml", f"data.train={digits_dir}", f"run_dir={run_dir}"]
    dry = run_cli(*common, "--sweep", good, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    snapshot = run_dir / "slurm"
    assert (
        f"-m pipeline sweep {snapshot / 'config.yaml'} {snapshot / 'sweep.yaml'} cluster.address="
        in dry.stdout
    )
    bad = write(tmp_path, {"parameters": {"optim.lrr": {"choice": [0.1]}}, "num_trials": 1}, "bad.yaml")
    refused = run_cli(*common, "--sweep", bad, "--dry-run")
    assert refused.returncode == 2 and "did you mean 'optim.lr'" in refused.stderr
    train = slurm.render(config.load("configs/smoke.yaml", [f"run_dir={run_dir}"]), tmp_path)
    assert f"-m pipeline train {snapshot / 'config.yaml'} cluster.address=" in train  # a run, as before
