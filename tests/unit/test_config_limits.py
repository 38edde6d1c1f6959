"""Issue 16, finding 8 (config items): bad values are refused at load (exit 2, before anything starts)
with an error that names the key(s) and the fix, instead of a raw traceback, a pydantic prefix, or a
run that overflows or hangs later."""

import pytest

from pipeline import config
from pipeline.config import ConfigError
from tests.helpers import run_cli

BASE = "configs/smoke.yaml"


def refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        config.load(BASE, list(overrides))
    return str(e.value)


def test_a_cross_field_error_names_its_keys_without_pydantic_noise():
    message = refused("optim.warmup_steps=300", "train.max_steps=300")
    assert "optim.warmup_steps (300) must be smaller than train.max_steps (300)" in message
    assert "Value error" not in message and "(top level)" not in message
    message = refused("zero.stage=2", "zero.offload_params=true")
    assert "config key 'zero.offload_params'" in message and "zero.stage=3" in message
    assert "Value error" not in message


def test_a_field_validators_message_has_no_pydantic_prefix():
    message = refused("name=a/b")
    assert "config key 'name': must be a non-empty name" in message and "Value error" not in message


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml is not UTF-8 text .*byte 9.*save it as UTF-8"):
        config.load(path)
    proc = run_cli("train", str(path), "--dry-run")  # the CLI's exit 2, no traceback
    assert proc.returncode == 2 and proc.stderr.startswith("error: config file "), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=.inf", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("optim.weight_decay=.inf", "optim.weight_decay"),
        ("train.clip_grad_norm=.nan", "train.clip_grad_norm"),
        ("data.cache_mb=.inf", "data.cache_mb"),
        ("init_from.lr_mult={head: .inf}", "init_from.lr_mult.head"),
        ("task.optim={model: {lr: .inf}}", "model.lr"),
    ],
)
def test_non_finite_numbers_are_refused(override, key):
    message = refused(override)
    assert f"'{key}'" in message and "finite" in message, message


@pytest.mark.parametrize("betas", ["[1.5, 0.999]", "[0.9, -0.1]", "[0.9, 1.0]"])
def test_adam_betas_are_in_0_1(betas):
    assert "config key 'optim.betas" in refused(f"optim.betas={betas}")


@pytest.mark.parametrize("seed", [2**63, 2**64, -1, 2**32])
def test_seeds_outside_0_to_2_32_are_refused(seed):
    # torch.manual_seed(seed * 100_003 + ...) overflows far below 2**63; numpy refuses negative seeds
    message = refused(f"seed={seed}")
    assert "config key 'seed'" in message
    assert "less than or equal to 4294967295" in message or "greater than or equal to 0" in message


def test_the_largest_seed_is_accepted():
    assert config.load(BASE, [f"seed={2**32 - 1}"]).seed == 2**32 - 1


@pytest.mark.parametrize("size", ["[0, 0]", "[8, -1]", "[100000, 100000]"])
def test_image_size_is_positive_and_bounded(size):
    assert "config key 'data.image_size" in refused(f"data.image_size={size}")


@pytest.mark.parametrize(
    "override",
    [
        "cluster.collective_timeout_s=1000000000000000000000",  # timedelta overflow in torch/Ray
        "cluster.collective_timeout_s=604801",  # more than 7 days
    ],
)
def test_timeouts_are_bounded(override):
    key = override.split("=")[0]
    assert f"config key '{key}'" in refused(override)


@pytest.mark.parametrize(
    "override",
    [
        "data.batch_size=1099511627776",
        "train.max_steps=1125899906842624",
        "train.grad_accum=1099511627776",
        "cluster.num_workers=1000000",
        "data.num_workers=100000",
        "data.shuffle_buffer=10000000000000",
    ],
)
def test_sizes_no_machine_can_hold_are_refused(override):
    key = override.split("=")[0]
    assert f"config key '{key}'" in refused(override)


def test_samples_over_the_run_must_fit_int64_counters():
    message = refused("train.max_steps=1099511627776", "data.batch_size=1048576", "train.grad_accum=65536")
    assert "train.max_steps x data.batch_size x train.grad_accum x cluster.num_workers" in message


def test_bounds_leave_real_runs_alone():
    cfg = config.load(
        BASE,
        ["train.max_steps=1000000000", "data.batch_size=65536", "cluster.collective_timeout_s=604800"],
    )
    assert cfg.train.max_steps == 10**9


def test_parameter_offload_below_stage_3_is_refused_in_the_raw_deepspeed_dict_too():
    # DeepSpeed silently ignores offload_param below stage 3 (a run trained without it, exit 0)
    message = refused("zero.stage=2", "deepspeed={zero_optimization: {offload_param: {device: cpu}}}")
    assert "config key 'deepspeed.zero_optimization.offload_param'" in message and "stage 3" in message
    message = refused(
        "deepspeed={zero_optimization: {stage: 1, offload_param: {device: cpu}}}", "zero.stage=3"
    )
    assert "(DeepSpeed ignores it at stage 1)" in message
    config.load(BASE, ["zero.stage=2", "deepspeed={zero_optimization: {offload_param: {device: none}}}"])


def test_nvme_offload_needs_a_path():
    message = refused("zero.stage=3", "deepspeed={zero_optimization: {offload_optimizer: {device: nvme}}}")
    assert "config key 'deepspeed.zero_optimization.offload_optimizer'" in message and "nvme_path" in message


def test_nvme_offload_where_deepspeeds_async_io_cannot_build_is_refused_before_start(
    digits_dir, tmp_path, monkeypatch
):
    """Seen here (no libaio): the workers died with a raw `RuntimeError: Unable to JIT load the
    async_io op` traceback, exit 1, after Ray and the run dir had started."""
    from pipeline import engine
    from pipeline.launch.plan import make_plan

    problem = engine.async_io_problem()
    assert problem is None or "libaio" in problem
    monkeypatch.setattr(engine, "async_io_problem", lambda: "DeepSpeed's async_io op needs libaio")
    nvme = f"{{device: nvme, nvme_path: {tmp_path}}}"
    cfg = config.load(
        BASE,
        [
            f"data.train={digits_dir}",
            "zero.stage=3",
            f"deepspeed={{zero_optimization: {{offload_param: {nvme}}}}}",
        ],
    )
    with pytest.raises(
        ConfigError, match=r"'deepspeed\.zero_optimization\.offload_param'.*libaio.*device: cpu"
    ):
        make_plan(cfg)


def test_a_raw_deepspeed_section_deepspeed_refuses_is_refused_before_start(digits_dir):
    """Seen here: `deepspeed={zero_optimization: {offload_param: {device:cpu}}}` (no space: one key
    "device:cpu") passed the preflight, then every worker died with pydantic's raw traceback, exit 1."""
    from pipeline.launch.plan import make_plan

    overrides = [f"data.train={digits_dir}", "zero.stage=3"]
    cfg = config.load(BASE, [*overrides, "deepspeed={zero_optimization: {offload_param: {device:cpu}}}"])
    with pytest.raises(
        ConfigError, match=r"'deepspeed': DeepSpeed refuses it: .*offload_param\.device:cpu: Extra"
    ):
        make_plan(cfg)
    make_plan(
        config.load(BASE, [*overrides, "deepspeed={zero_optimization: {offload_param: {device: cpu}}}"])
    )
