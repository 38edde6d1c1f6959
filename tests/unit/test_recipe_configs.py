"""Every file in configs/ loads, validates and dry-runs (model + task + data checked, nothing started)."""

from __future__ import annotations

import pytest

from pipeline import config, tasks
from pipeline.launch.plan import make_plan
from tests.helpers import REPO, run_cli

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
EXAMPLE = REPO / "examples" / "myproject"


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    """The 5,000 real MNIST digits as 28x28 shards (what the mnist5k recipes read)."""
    from pipeline.data import shards, sources

    out = tmp_path_factory.mktemp("data") / "mnist5k"
    shards.write_prepared(
        sources.mnist5k(), out, samples_per_shard=250, val_fraction=0.1, seed=0, overwrite=False
    )
    return out


def overrides_for(path, digits_dir, mnist_dir, run_dir, text_dir):
    """Where the test keeps the data the config names; a fine-tuning config's pretrained run is
    replaced by a fresh init (tests/faults/test_finetune.py runs the real pretrain -> fine-tune chain)."""
    cfg = config.load(path)
    if cfg.env.id:  # an environment task (PPO): no shards
        return [f"run_dir={run_dir}"]
    data = mnist_dir if "mnist" in cfg.data.train else text_dir if "text" in cfg.data.train else digits_dir
    extra = ["init_from.path=null"] if cfg.init_from.path else []
    if cfg.data.decode:  # the example project's own format: tests/integration/test_example_project.py
        extra.append("data.decode=null")
    return [f"data.train={data}", f"run_dir={run_dir}", *extra]


@pytest.fixture(autouse=True)
def example_project_importable(monkeypatch):
    """configs/example-myproject.yaml names the user project's classes (README: PYTHONPATH)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLE))


def test_there_is_a_config_per_recipe():
    names = {p.stem for p in CONFIGS}
    assert {
        "resnet18-mnist5k",
        "lstm-rows-mnist5k",
        "gru-rows-mnist5k",
        "lstm-next-row-mnist5k",
        "dcgan-mnist5k",
        "vae-mnist5k",
        "autoencoder-mnist5k",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates_and_starts_with_a_comment_naming_its_command(
    path, digits_dir, mnist_dir, text_dir, tmp_path
):
    text = path.read_text()
    assert text.startswith("# "), f"{path.name} must start with a comment saying what it is"
    assert f"pipeline train configs/{path.name}" in text, f"{path.name}'s header must give the exact command"
    cfg = config.load(path, overrides_for(path, digits_dir, mnist_dir, tmp_path / "r", text_dir))
    task = tasks.build(cfg.task.name, cfg.task.args)
    plan = make_plan(cfg)  # builds the model on the data's shape, checks the task fits it
    assert plan.params_trainable > 0
    assert set(cfg.task.optim) <= set(task.ENGINES)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_dry_run(path, digits_dir, mnist_dir, text_dir, tmp_path):
    proc = run_cli(
        "train",
        str(path),
        *overrides_for(path, digits_dir, mnist_dir, tmp_path / "run", text_dir),
        "--dry-run",
        timeout_s=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fresh start" in proc.stdout
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
