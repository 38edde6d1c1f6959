import itertools

import pytest
import torch

from pipeline import models
from pipeline.config import ConfigError, OptimConfig, TrainConfig, ZeroConfig
from pipeline.engine import deepspeed_config, lr_factor, param_groups


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_models_adapt_to_the_input_shape(name, shape):
    model = models.build(name, {"activation": "gelu", "dropout": 0.2}, shape, 10)
    out = model(torch.randn(4, *shape))
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("activation", ["relu", "gelu", "leaky_relu", "silu", "tanh"])
def test_every_activation_builds(activation):
    model = models.build("cnn", {"activation": activation, "channels": [4, 8]}, (1, 8, 8), 3)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_model_arg_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.args\.chanels.*did you mean 'model\.args\.channels'"):
        models.check_args("cnn", {"chanels": [8]})
    with pytest.raises(ConfigError, match=r"'model\.name'.*did you mean 'cnn'"):
        models.check_args("cnnn", {})
    with pytest.raises(ConfigError, match=r"model\.args\.activation"):
        models.check_args("mlp", {"activation": "swish2"})
    with pytest.raises(ConfigError, match=r"model\.args\.num_classes.*taken from the data"):
        models.check_args("mlp", {"num_classes": 3})


def test_weight_decay_skips_biases_and_norms():
    model = models.build("cnn", {"channels": [4]}, (1, 8, 8), 3)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    n_params = sum(1 for _ in model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_params


def test_warmup_then_cosine_to_min_lr():
    optim = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(s, optim, 110) for s in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.55)
    assert factors[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    linear = OptimConfig(lr=1.0, schedule="linear")
    assert lr_factor(50, linear, 100) == pytest.approx(0.5)


def test_deepspeed_config_precision_and_raw_merge():
    train = TrainConfig(grad_accum=4, clip_grad_norm=1.0)
    cfg = deepspeed_config(
        micro_batch_size=8,
        train=train,
        precision="bf16",
        zero=ZeroConfig(stage=3),
        raw={"zero_optimization": {"reduce_bucket_size": 1000}},
    )
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["gradient_clipping"] == 1.0
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in cfg
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["zero_optimization"]["reduce_bucket_size"] == 1000
    fp32 = deepspeed_config(
        micro_batch_size=8, train=train, precision="fp32", zero=ZeroConfig(stage=0), raw={}
    )
    assert "torch_autocast" not in fp32 and "fp16" not in fp32


def test_who_clips_and_when_the_gradient_norm_is_computed():
    clip, plain = TrainConfig(clip_grad_norm=1.0), TrainConfig()

    def ds(stage, train, precision="bf16", **zero):
        zero_cfg = ZeroConfig(stage=stage, **zero)
        return deepspeed_config(micro_batch_size=8, train=train, precision=precision, zero=zero_cfg, raw={})

    # ZeRO-0 clips in Engine.step (no norm all-reduce); under fp16 and ZeRO-1+ DeepSpeed clips
    assert ds(0, clip)["gradient_clipping"] == 0.0
    assert ds(0, clip, "fp16")["gradient_clipping"] == 1.0 and ds(2, clip)["gradient_clipping"] == 1.0
    # ZeRO-1/2 without clipping compute the norm only when it is logged (Engine.measure_grad_norm)
    assert ds(1, plain)["zero_optimization"]["compute_grad_norm"] is False
    assert ds(2, plain)["zero_optimization"]["compute_grad_norm"] is False
    assert "compute_grad_norm" not in ds(2, clip)["zero_optimization"]
    assert "compute_grad_norm" not in ds(3, plain)["zero_optimization"]
    assert "compute_grad_norm" not in ds(2, plain, offload_optimizer=True)["zero_optimization"]


def test_fp16_engines_get_half_inputs_and_give_fp32_outputs():
    """DeepSpeed's fp16 casts the module to half but not its inputs (a conv then fails on the GPU)."""
    from pipeline.engine import _cast_floating

    x, labels = torch.ones(2, 3), torch.tensor([1, 2])
    cast = _cast_floating({"x": [x, labels], "t": (x,), "n": 3}, torch.half)
    assert cast["x"][0].dtype == torch.half and cast["x"][1].dtype == torch.long
    assert cast["t"][0].dtype == torch.half and cast["n"] == 3
    assert _cast_floating((x.half(), labels), torch.float32)[0].dtype == torch.float32
