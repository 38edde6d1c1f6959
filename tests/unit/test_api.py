"""The public Python API without training: a cheap `import pipeline`, `Result.from_path` on a run dir
written here, `load_config` with dict overrides and its errors, users' code made importable on
workers (payload, Ray job, Slurm script), and no exit calls in library code."""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import pipeline
from pipeline import api, config
from pipeline.config import ConfigError
from tests.helpers import REPO

SMOKE = REPO / "configs" / "smoke.yaml"
USERPKG = REPO / "tests" / "userpkg"


def test_import_pipeline_is_cheap_and_exports_lazily():
    code = """
import sys
import pipeline
heavy = ("torch", "ray", "deepspeed", "wandb", "webdataset", "pipeline.api", "pipeline.launch")
assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
assert pipeline.load_config and pipeline.Result and pipeline.ConfigError and pipeline.Preempted
assert callable(pipeline.train)
assert not [m for m in ("torch", "ray") if m in sys.modules]  # the API module is light too
assert pipeline.TrainingFailed.__name__ == "TrainingFailed" and pipeline.Task and pipeline.Step
from pipeline.training import loop  # the worker's subpackage: no clash with the function pipeline.train
assert callable(pipeline.train) and pipeline.train.__module__ == "pipeline.api"
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_public_names_are_the_documented_ones():
    expected = {"train", "load_config", "Result", "evaluate", "export", "ConfigError", "TrainingFailed"}
    expected |= {"Preempted", "Task", "Step"}
    assert expected <= set(pipeline.__all__) and expected <= set(dir(pipeline))
    assert pipeline.ConfigError is ConfigError and pipeline.Preempted is api.Preempted
    with pytest.raises(AttributeError):
        pipeline.no_such_name  # noqa: B018


def write_run_dir(run_dir: Path, *, extra: list[str] = (), preempted: bool = False) -> None:
    """A run dir as a 2-worker run leaves it: a resumed second segment, evals at 10 and 20 (a tie on
    eval/accuracy: the earlier wins), two commits, a torn last metrics line."""
    cfg = config.load(SMOKE, [f"run_dir={run_dir}", "data.train=/data/digits", *extra])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config.dump_yaml(cfg))
    rows = [
        {"step": 5, "time": 1.0, "train/loss": 2.0, "train/lr": 0.001},
        {"step": 10, "time": 2.0, "train/loss": 1.0, "train/lr": 0.002},
        {"step": 10, "time": 2.5, "eval/accuracy": 0.9, "eval/loss": 0.5},
        {"step": 15, "time": 3.0, "train/loss": 0.5, "train/lr": 0.001},
        {"step": 20, "time": 4.0, "eval/accuracy": 0.9, "eval/loss": 0.3},
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 21, "train/lo'  # killed mid-write
    (run_dir / "metrics.jsonl").write_text(text)
    events = [
        {"event": "start", "run_id": "first"},
        {"event": "checkpoint_commit", "step": 10},
        {"event": "start", "run_id": "abc123"},
        {"event": "resume", "from_step": 10},
        {"event": "checkpoint_commit", "step": 20},
    ]
    events += [{"event": "preempted", "step": 20}] if preempted else []
    events += [{"event": "finish", "step": 20, "preempted": preempted}]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    for step in (10, 20):
        ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "MANIFEST.json").write_text("{}")
    (run_dir / "checkpoints" / ".tmp-step_00000030").mkdir()  # debris of a save that never committed


def test_result_from_path_reads_a_run_dir(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    write_run_dir(run_dir)
    result = pipeline.Result.from_path(run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert result.metrics_history == [json.loads(line) for line in lines[:-1]]  # not the torn line
    assert result.metrics == {
        "step": 20,
        "time": 4.0,
        "train/loss": 0.5,
        "train/lr": 0.001,
        "eval/accuracy": 0.9,
        "eval/loss": 0.3,
    }
    assert result.best == api.Best("eval/accuracy", 0.9, 10)  # the task's (classify) best metric, max
    assert result.checkpoint == str(run_dir / "checkpoints" / "step_00000020")
    assert (result.run_id, result.step, result.preempted) == ("abc123", 20, False)
    assert result.run_dir == run_dir and result.config.name == "smoke"
    monkeypatch.chdir(tmp_path)
    assert pipeline.Result.from_path("run") == result  # reproducible from the files, any cwd
    assert json.loads(json.dumps(result.best)) == ["eval/accuracy", 0.9, 10]


def test_result_best_follows_checkpoint_best_metric_and_a_preempted_segment(tmp_path):
    run_dir = tmp_path / "run"
    write_run_dir(
        run_dir, extra=["checkpoint.best_metric=eval/loss", "checkpoint.best_mode=min"], preempted=True
    )
    result = pipeline.Result.from_path(run_dir)
    assert result.best == api.Best("eval/loss", 0.3, 20)
    assert result.preempted and result.step == 20
    assert "step 20" in str(api.Preempted(result)) and api.Preempted(result).result is result


def test_result_of_a_dir_that_is_no_run_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no config.yaml"):
        pipeline.Result.from_path(tmp_path)


def test_load_config_with_dict_overrides_deep_merges():
    cfg = pipeline.load_config(SMOKE, {"train": {"max_steps": 50}, "model": {"name": "mlp", "args": {}}})
    assert cfg.train.max_steps == 50 and cfg.train.eval_every == 100  # the other keys of the section stay
    assert cfg.model.args == {}  # a free-form dict is a value: replaced, as model.args={} on the CLI
    one_arg = pipeline.load_config(SMOKE, {"model.args.dropout": 0.2})  # as model.args.dropout=0.2
    assert one_arg.model.args == {"channels": [32, 64], "activation": "relu", "dropout": 0.2}
    dotted = pipeline.load_config(SMOKE, {"train.max_steps": 50, "task": "autoencoder"})
    assert dotted.train.max_steps == 50 and dotted.task.name == "autoencoder"  # `task: NAME` shorthand
    assert pipeline.load_config(SMOKE, ["train.max_steps=50"]).train.max_steps == 50  # as on the CLI
    tree = yaml.safe_load(SMOKE.read_text())
    assert pipeline.load_config(tree, {"seed": 3}).seed == 3  # a dict config
    assert pipeline.load_config(cfg, ["seed=4"]).seed == 4  # a Config
    assert pipeline.load_config(cfg) == cfg


@pytest.mark.parametrize(
    "overrides",
    [{"train": {"max_step": 5}}, {"train.max_step": 5}, ["train.max_step=5"]],
    ids=["nested", "dotted", "cli"],
)
def test_a_bad_key_raises_config_error_naming_it(overrides):
    with pytest.raises(ConfigError, match=r"'train\.max_step'.*did you mean 'train\.max_steps'"):
        pipeline.load_config(SMOKE, overrides)


def test_wrong_types_and_bad_sections_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"'train\.max_steps'"):
        pipeline.load_config(SMOKE, {"train": {"max_steps": "many"}})
    with pytest.raises(ConfigError, match=r"'train' .* must be a section"):
        pipeline.load_config(SMOKE, {"train": 5})
    with pytest.raises(ConfigError, match="did you mean 'optim'"):
        pipeline.load_config({"data": {"train": "x"}, "optimm": {}})
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="optim.lrr"):  # before anything starts: no run dir
        pipeline.train(SMOKE, run_dir=str(run_dir), optim={"lrr": 1})
    assert not run_dir.exists()


# --- users' code on workers ----------------------------------------------------------------------------


@pytest.fixture
def userpkg(monkeypatch):
    """On sys.path as a notebook would put it (not in PYTHONPATH)."""
    monkeypatch.syspath_prepend(str(USERPKG))
    yield
    for name in [m for m in sys.modules if m == "userpkg" or m.startswith("userpkg.")]:
        del sys.modules[name]


def user_cfg(digits_dir, tmp_path, **sections):
    return pipeline.load_config(
        SMOKE,
        {"data": {"train": str(digits_dir)}, "run_dir": str(tmp_path / "run"), "cluster.launcher": "local"}
        | sections,
    )


def test_the_payload_names_where_users_modules_were_found(userpkg, digits_dir, tmp_path, monkeypatch):
    from pipeline.launch.plan import make_plan, worker_payload

    monkeypatch.chdir(REPO)
    cfg = user_cfg(
        digits_dir,
        tmp_path,
        model={"name": "tests/userpkg/userpkg/models.py:TinyNet", "args": {"hidden": 8}},
        task={"name": "userpkg.tasks:SmoothClassify"},
    )
    plan = make_plan(cfg)
    models_file = USERPKG / "userpkg" / "models.py"
    assert plan.cfg.model.name == f"{models_file}:TinyNet"  # absolute: workers may run elsewhere
    assert plan.cfg.task.name == "userpkg.tasks:SmoothClassify"  # a module path stays as given
    payload = worker_payload(plan, "r")
    assert payload["module_roots"] == [str(USERPKG)]  # a file is loaded by its path on every side
    built_in = worker_payload(make_plan(user_cfg(digits_dir, tmp_path)), "r")
    assert built_in["module_roots"] == []


def test_a_ray_job_ships_users_packages_and_wraps_files(userpkg, digits_dir, tmp_path, monkeypatch):
    from pipeline import imports
    from pipeline.launch import ray as ray_launcher
    from pipeline.launch.plan import make_plan

    monkeypatch.chdir(REPO)
    cfg = make_plan(
        user_cfg(
            digits_dir,
            tmp_path,
            model={"name": "tests/userpkg/userpkg/models.py:TinyNet", "args": {}},
            task={"name": "userpkg.tasks:SmoothClassify"},
        )
    ).cfg
    extra = tmp_path / "extra.py"
    extra.write_text("X = 1\n")
    out = io.StringIO()
    job_cfg, modules = ray_launcher.job_code(cfg, [str(extra)], tmp_path / "staging", out)
    package, _, rest = job_cfg.model.name.partition(".")
    assert package.startswith("_pipeline_file_") and rest == "models:TinyNet"
    wrapped = tmp_path / "staging" / "py_modules" / package
    assert sorted(p.name for p in wrapped.iterdir()) == ["__init__.py", "models.py"]
    assert job_cfg.task.name == cfg.task.name
    assert modules == [str(wrapped), str(USERPKG / "userpkg"), str(extra)]
    # as a worker imports it: Ray puts each shipped dir's parent (a .py file's dir) on sys.path
    monkeypatch.syspath_prepend(str(wrapped.parent))
    assert imports.load_object(job_cfg.model.name, key="model.name").__name__ == "TinyNet"
    with pytest.raises(ConfigError, match="--py-modules"):
        ray_launcher.job_code(cfg, [str(tmp_path / "missing")], tmp_path / "staging2", out)


def test_installed_packages_are_not_shipped(tmp_path):
    from pipeline.launch import ray as ray_launcher

    cfg = pipeline.load_config(SMOKE, {"data.decode": "json:loads", "run_dir": str(tmp_path)})
    out = io.StringIO()
    _, modules = ray_launcher.job_code(cfg, [], tmp_path / "staging", out)
    assert modules == [] and "data.decode=json:loads comes from an installed package" in out.getvalue()


# --- library code raises, only the CLI exits ----------------------------------------------------------

# (file, where, call): the only exits in pipeline/. The CLI turns exceptions into exit codes; a local
# worker leaves with os._exit(0) once its result is out (see the comment there); the Slurm helper
# script's `python -m pipeline.launch.slurm` entry exits with its status.
ALLOWED_EXITS = {
    ("pipeline/launch/local.py", "worker", "os._exit"),
    ("pipeline/launch/slurm.py", "__main__", "sys.exit"),
}
EXIT_CALLS = {"sys.exit", "os._exit", "typer.Exit", "exit", "quit", "SystemExit", "_exit", "Exit"}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    return None


def _exits(path: Path) -> set[tuple[str, str, str]]:
    """(file, enclosing function or '__main__' block or 'module', call) of every exit in one file."""
    found: set[tuple[str, str, str]] = set()
    rel = str(path.relative_to(REPO))

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = where
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = child.name
            elif isinstance(child, ast.If) and "__main__" in ast.unparse(child.test):
                inner = "__main__"
            target = None
            if isinstance(child, ast.Call):
                target = _dotted(child.func)
            elif isinstance(child, ast.Raise) and child.exc is not None:
                target = _dotted(child.exc)
            elif isinstance(child, ast.ImportFrom) and child.module in ("sys", "os", "typer"):
                names = {f"{child.module}.{a.name}" for a in child.names}
                target = next(iter(names & {"sys.exit", "os._exit", "typer.Exit"}), None)
            if target in EXIT_CALLS:
                found.add((rel, inner, target))
            visit(child, inner)

    visit(ast.parse(path.read_text()), "module")
    return found


def test_library_code_never_exits():
    cli = REPO / "pipeline" / "__main__.py"
    found = set().union(*(_exits(p) for p in sorted((REPO / "pipeline").rglob("*.py")) if p != cli))
    assert found == ALLOWED_EXITS, (
        "library code raises (ConfigError, TrainingFailed, Preempted); only the CLI exits"
    )
    assert _exits(cli)  # the scan sees exits where they are (the CLI's typer.Exit, sys.exit)
