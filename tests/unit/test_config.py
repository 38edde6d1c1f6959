from pathlib import Path

import pytest

from pipeline import config
from pipeline.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"


def test_smoke_config_loads_with_overrides():
    cfg = config.load(
        SMOKE, ["optim.lr=3e-4", "zero.stage=3", "cluster.num_workers=1", "model.args.dropout=0.2"]
    )
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.zero.stage == 3
    assert cfg.cluster.num_workers == 1
    assert cfg.model.args["dropout"] == 0.2
    assert cfg.resolved_run_dir == Path("runs/smoke")


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean 'optim\.lr'"):
        config.load(SMOKE, ["optim.lrr=1"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {train: x}\ntrian: {max_steps: 3}\n")
    with pytest.raises(ConfigError, match=r"'trian'.*bad\.yaml.*did you mean 'train'"):
        config.load(bad)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=abc", "optim.lr"),
        ("zero.stage=5", "zero.stage"),
        ("cluster.num_workers=0", "cluster.num_workers"),
        ("train.max_steps=-1", "train.max_steps"),
        ("precision=fp8", "precision"),
        ("optim.name=lion", "optim.name"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        config.load(SMOKE, [override])


def test_impossible_combinations():
    with pytest.raises(ConfigError, match="fp16 needs GPUs"):
        config.load(SMOKE, ["precision=fp16"])
    with pytest.raises(ConfigError, match="offload_params needs zero.stage=3"):
        config.load(SMOKE, ["zero.offload_params=true"])
    with pytest.raises(ConfigError, match="warmup_steps"):
        config.load(SMOKE, ["train.max_steps=10", "optim.warmup_steps=10"])


def test_section_given_a_scalar():
    with pytest.raises(ConfigError, match="'optim'.*must be a section"):
        config.load(SMOKE, ["optim=3"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        config.load(SMOKE, ["optim.lr"])
    with pytest.raises(ConfigError, match="empty key"):
        config.load(SMOKE, ["optim..lr=1"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.yaml")


def test_round_trip_and_digest():
    cfg = config.load(SMOKE)
    again = config.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.digest() == cfg.digest()
    assert config.load(SMOKE, ["seed=1"]).digest() != cfg.digest()
