"""`train.compile` (issue 19): the config key's forms and errors, what the plan refuses before anything
starts (exit 2) and says it will do, and the startup breakdown's compile_s."""

import pytest
from torch._inductor import config as inductor_config

from pipeline import config as config_mod
from pipeline.config import ConfigError
from pipeline.engine import compile_problem
from pipeline.launch.plan import make_plan
from pipeline.training import telemetry
from tests.helpers import run_cli


def load(*overrides, digits_dir=None):
    data = [f"data.train={digits_dir}"] if digits_dir else []
    return config_mod.load("configs/smoke.yaml", [*data, *overrides])


def test_true_false_and_a_mapping_become_torch_compile_options():
    assert load().train.compile_options is None
    assert load("train.compile=false").train.compile_options is None
    assert load("train.compile=true").train.compile_options == {"mode": "default", "dynamic": None}
    options = load("train.compile={mode: max-autotune-no-cudagraphs, dynamic: true}").train.compile_options
    assert options == {"mode": "max-autotune-no-cudagraphs", "dynamic": True}
    assert load("train.compile=true").to_dict()["train"]["compile"] is True  # the config file round-trips


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.compile=maybe", r"'train.compile': must be true, false or a mapping"),
        ("train.compile={mode: fast}", r"'train.compile': mode: Input should be 'default'.*got 'fast'"),
        ("train.compile={backend: eager}", r"'train.compile': backend: Extra inputs are not permitted"),
    ],
)
def test_a_bad_setting_names_the_key_and_what_it_accepts(override, message):
    with pytest.raises(ConfigError, match=message):
        load(override)


def test_cuda_graph_modes_need_a_gpu_and_cpu_compiles_need_a_cxx_compiler():
    problem = compile_problem({"mode": "reduce-overhead", "dynamic": None}, use_gpu=False)
    assert "CUDA graphs" in problem and "cluster.use_gpu=true" in problem
    assert compile_problem({"mode": "default", "dynamic": None}, use_gpu=False) is None  # g++ is here
    with inductor_config.patch({"cpp.cxx": ("no-such-cxx-compiler",)}):
        problem = compile_problem({"mode": "default", "dynamic": None}, use_gpu=False)
    assert "needs a C++ compiler" in problem and "train.compile=false" in problem


def test_the_plan_says_it_compiles_and_refuses_what_cannot_work_with_exit_2(digits_dir):
    plan = make_plan(load("train.compile={mode: default, dynamic: false}", digits_dir=digits_dir))
    assert "ZeRO stage 2; torch.compile (mode default, dynamic=false; the first step compiles)" in (
        plan.describe()
    )
    refused = run_cli(
        "train", "configs/smoke.yaml", f"data.train={digits_dir}", "train.compile={mode: reduce-overhead}"
    )
    assert refused.returncode == 2
    assert "config key 'train.compile': train.compile mode 'reduce-overhead' is CUDA graphs" in refused.stderr


def test_the_startup_breakdown_reports_compile_seconds_as_part_of_the_first_step():
    marks = {"worker": 0.0, "engines": 1.0, "loop": 1.5, "first_batch_wait": 0.5, "first_step": 9.0}
    assert "compile_s" not in telemetry.startup_phases(marks)
    phases = telemetry.startup_phases(marks | {"compile": 6.25})
    assert phases["compile_s"] == 6.25 and phases["first_step_s"] == 7.0


def test_bench_compile_names_its_recipes_and_refuses_others(tmp_path):
    proc = run_cli("bench", "compile", "--recipes", "dcgan", "--data", str(tmp_path / "data"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "'dcgan' is no recipe of bench compile; choose from cnn, resnet18, lstm" in proc.stderr
    assert not (tmp_path / "data").exists()  # refused before preparing any data
