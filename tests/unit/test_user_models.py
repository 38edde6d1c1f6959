"""`model.name` as an import path (`package.module:Class`, `path/to/file.py:Class`): the user's nn.Module
gets model.args plus the data's input_shape/num_classes when it names them, and every mistake is a
ConfigError naming the key before any worker starts."""

from __future__ import annotations

import sys

import pytest
import torch

from pipeline import models
from pipeline.config import ConfigError
from tests.helpers import run_cli

NETS = '''
import torch
from torch import nn


class Net(nn.Module):
    """Takes the data's shape and classes, and its own args."""

    def __init__(self, input_shape, num_classes, hidden=16, dropout=0.0):
        super().__init__()
        self.input_shape = input_shape
        c, h, w = input_shape
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


class Fixed(nn.Module):
    """Names neither input_shape nor num_classes: gets only its args."""

    def __init__(self, size: int):
        super().__init__()
        self.fc = nn.Linear(size, 3)


class Anything(nn.Module):
    def __init__(self, num_classes, **kwargs):
        super().__init__()
        self.kwargs = kwargs
        self.fc = nn.Linear(4, num_classes)


class Broken(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        raise RuntimeError("no GPU kernels for this layer")


def not_a_module():
    return 1


class NotAModule:
    pass
'''


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """The same code as a file and as a package module `usernets.nets` on sys.path."""
    (tmp_path / "nets.py").write_text(NETS)
    (tmp_path / "usernets").mkdir()
    (tmp_path / "usernets" / "__init__.py").write_text("")
    (tmp_path / "usernets" / "nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("usernets.nets", None)
    sys.modules.pop("usernets", None)


@pytest.mark.parametrize("form", ["file", "module"])
def test_a_user_model_gets_its_args_and_the_data_shape(nets, form):
    name = f"{nets / 'nets.py'}:Net" if form == "file" else "usernets.nets:Net"
    model = models.build(name, {"hidden": 8}, [1, 8, 8], 10)
    assert model.input_shape == (1, 8, 8)  # a tuple, as built-in models get it
    assert model.fc.out_features == 10 and model.fc.in_features == 8
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_data_keys_are_passed_only_when_the_constructor_names_them(nets):
    fixed = models.build("usernets.nets:Fixed", {"size": 5}, [1, 8, 8], 10)
    assert fixed.fc.in_features == 5
    anything = models.build("usernets.nets:Anything", {"whatever": [1, 2], "depth": 3}, [1, 8, 8], 7)
    assert anything.kwargs == {"whatever": (1, 2), "depth": 3}  # **kwargs takes anything; lists -> tuples
    assert anything.fc.out_features == 7


def test_wrong_args_name_the_key_with_a_did_you_mean(nets):
    with pytest.raises(ConfigError, match=r"'model\.args\.hiden'.*did you mean 'model\.args\.hidden'"):
        models.build("usernets.nets:Net", {"hiden": 8}, [1, 8, 8], 10)
    with pytest.raises(ConfigError, match=r"'model\.args\.num_classes' is taken from the data"):
        models.check_args("usernets.nets:Net", {"num_classes": 3})
    with pytest.raises(ConfigError, match=r"'model\.args'.*needs 'size'"):
        models.check_args("usernets.nets:Fixed", {})
    # an "activation" arg of the user's own means what the user says
    with pytest.raises(ConfigError, match=r"'model\.args\.activation'.*valid: hidden, dropout"):
        models.check_args("usernets.nets:Net", {"activation": "mish"})


def test_bad_paths_name_model_name_and_the_path(nets, tmp_path):
    cases = {
        "usernets.nope:Net": r"'model\.name'.*cannot import module 'usernets\.nope'",
        f"{tmp_path / 'absent.py'}:Net": r"'model\.name'.*absent\.py does not exist",
        "usernets.nets:Nett": r"'model\.name'.*'usernets\.nets' has no 'Nett'",
        "usernets.nets:not_a_module": r"'model\.name'.*'usernets\.nets:not_a_module' is a function",
        "usernets.nets:NotAModule": r"'model\.name'.*NotAModule' is a class, but not a subclass of torch\.nn",
    }
    for name, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            models.build(name, {}, [1, 8, 8], 10)


def test_a_constructor_that_raises_names_the_class_and_the_error(nets):
    with pytest.raises(
        ConfigError, match=r"'model\.args'.*usernets\.nets:Broken.*Broken.*RuntimeError: no GPU kernels"
    ):
        models.build("usernets.nets:Broken", {}, [1, 8, 8], 10)


def test_the_cli_refuses_a_bad_user_model_before_anything_starts(nets, digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "train",
        "configs/smoke.yaml",
        f"data.train={digits_dir}",
        f"run_dir={run_dir}",
        f"model.name={nets / 'nets.py'}:Broken",
        "model.args={}",
        "--dry-run",
        timeout_s=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "model.args" in proc.stderr and "RuntimeError: no GPU kernels" in proc.stderr
    assert not run_dir.exists()


def test_builtin_models_still_list_the_import_path_forms():
    with pytest.raises(ConfigError, match=r"did you mean 'resnet18'.*package\.module:Class"):
        models.check_args("resnet81", {})
