"""Pretrained weights that do not fit exactly: the first convolution adapted to the data's channels,
errors that say what to change (the model's own head, a width factor, an exclude pattern that matches
nothing), and BatchNorm layers that keep their running statistics (`init_from.freeze_batchnorm`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline import models
from pipeline.config import ConfigError, InitFromConfig
from pipeline.training import finetune, telemetry


def resnet(width: int, channels: int, classes: int) -> nn.Module:
    torch.manual_seed(0)
    return models.build("resnet18", {"width": width, "stem": "small"}, (channels, 8, 8), classes)


@pytest.fixture
def rgb_file(tmp_path):
    """A torchvision-layout ResNet-18 state dict: 3 input channels, 1000 classes (width 8, to be cheap)."""
    path = tmp_path / "rgb.pt"
    state = resnet(8, 3, 1000).state_dict()
    for key, value in state.items():  # running statistics that are not the defaults
        if key.endswith("running_mean") or key.endswith("running_var"):
            value.uniform_(0.5, 1.5)
    torch.save(state, path)
    return path, state


def test_to_one_channel_the_filters_are_summed():
    weight = torch.randn(4, 3, 3, 3)
    adapted, how = finetune.adapt_input_channels(weight, 1)
    assert how == "summed" and torch.equal(adapted, weight.sum(dim=1, keepdim=True))
    gray = torch.randn(2, 1, 8, 8)  # a gray image seen as RGB gives the same response
    same = nn.functional.conv2d(gray.expand(-1, 3, -1, -1), weight)
    assert torch.allclose(nn.functional.conv2d(gray, adapted), same, atol=1e-5)


@pytest.mark.parametrize("channels", [2, 4, 7])
def test_to_other_counts_the_filters_repeat_and_rescale(channels):
    weight = torch.randn(4, 3, 3, 3)
    adapted, how = finetune.adapt_input_channels(weight, channels)
    assert adapted.shape == (4, channels, 3, 3) and how == f"repeated, scaled by 3/{channels}"
    assert torch.allclose(adapted[:, 0], weight[:, 0] * 3 / channels)
    assert torch.allclose(adapted[:, channels - 1], weight[:, (channels - 1) % 3] * 3 / channels)
    flat = torch.randn(2, 1, 8, 8)  # equal channels: the response keeps its scale, on average
    ratio = nn.functional.conv2d(flat.expand(-1, channels, -1, -1), adapted).std() / (
        nn.functional.conv2d(flat.expand(-1, 3, -1, -1), weight).std()
    )
    assert 0.5 < ratio < 2


def test_rgb_weights_load_into_a_one_channel_model_with_conv1_adapted(rgb_file):
    path, state = rgb_file
    model = resnet(8, 1, 10)
    info = finetune.apply_init(model, InitFromConfig(path=str(path), exclude=["fc.*"]))
    assert info["adapted"] == ["conv1.weight: 3 -> 1 input channels (summed)"]
    assert info["excluded"] == ["fc.bias", "fc.weight"] and info["loaded"] == len(state) - 2
    loaded = model.state_dict()
    assert torch.equal(loaded["conv1.weight"], state["conv1.weight"].sum(dim=1, keepdim=True))
    assert all(
        torch.equal(loaded[k], v)
        for k, v in state.items()
        if k not in ("conv1.weight", "fc.weight", "fc.bias")
    )
    line = telemetry.format_init(info)
    assert f"{len(state) - 2} tensors from {path}; fresh: fc.bias, fc.weight; conv1.weight: 3 -> 1" in line


def test_without_adaptation_the_error_names_the_option(rgb_file):
    path, _ = rgb_file
    cfg = InitFromConfig(path=str(path), exclude=["fc.*"], adapt_input_channels=False)
    with pytest.raises(
        ConfigError, match=r"conv1\.weight reads other input channels: init_from\.adapt_input_channels=true"
    ):
        finetune.apply_init(resnet(8, 1, 10), cfg)


def test_a_head_that_does_not_fit_suggests_the_models_own_head(rgb_file):
    path, _ = rgb_file
    with pytest.raises(
        ConfigError, match=r"fc\.weight \(1000, 64\) vs \(10, 64\).*init_from\.exclude: \['fc\.\*'\]"
    ) as e:
        finetune.apply_init(resnet(8, 1, 10), InitFromConfig(path=str(path)))
    assert "head.*" not in str(e.value)
    cnn = models.build("cnn", {"channels": [4, 8]}, (1, 8, 8), 10)
    assert finetune.head_name(cnn) == "head.3" and finetune.head_name(resnet(8, 1, 10)) == "fc"


def test_an_exclude_pattern_that_matches_nothing_is_an_error(rgb_file):
    path, _ = rgb_file
    with pytest.raises(ConfigError, match=r"'init_from\.exclude': 'head\.\*' matches no key.*head is 'fc'"):
        finetune.apply_init(resnet(8, 1, 10), InitFromConfig(path=str(path), exclude=["head.*"]))


def test_a_width_mismatch_is_one_line_not_a_list(rgb_file):
    path, _ = rgb_file  # width 8 in the file; the model is built with width 4
    with pytest.raises(ConfigError) as e:
        finetune.apply_init(resnet(4, 1, 10), InitFromConfig(path=str(path), exclude=["fc.*"]))
    message = str(e.value)
    assert (
        "the file's layers are 2x wider than the model's" in message and "check model.args (width" in message
    )
    assert "e.g. bn1.weight (8,) vs (4,)" in message and len(message) < 400  # one example, not 100 keys
    with pytest.raises(ConfigError, match=r"the model's layers are 2x wider than the file's"):
        finetune.apply_init(resnet(16, 1, 10), InitFromConfig(path=str(path), exclude=["fc.*"]))


def bn_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def test_freeze_batchnorm_needs_a_frozen_batchnorm():
    model = resnet(4, 1, 10)
    with pytest.raises(ConfigError, match=r"'init_from\.freeze_batchnorm': no BatchNorm layer"):
        finetune.freeze(model, InitFromConfig(freeze=["fc.*"], freeze_batchnorm=True))
    cfg = InitFromConfig(freeze=["conv1.*", "bn1.*", "layer1.0.*"], freeze_batchnorm=True)
    finetune.freeze(model, cfg)
    held = finetune.frozen_batchnorms(model, cfg)
    names = {n for n, m in model.named_modules() if any(m is h for h in held)}
    assert names == {"bn1", "layer1.0.bn1", "layer1.0.bn2"}


@pytest.mark.parametrize("until_step", [0, 2])
def test_held_batchnorm_keeps_its_statistics_in_training(until_step):
    model = resnet(4, 1, 10)
    cfg = InitFromConfig(freeze=["bn1.*", "layer1.*"], freeze_batchnorm=True, unfreeze_at_step=until_step)
    finetune.freeze(model, cfg)
    steps = [0]
    held = finetune.frozen_batchnorms(model, cfg)
    assert finetune.hold_batchnorm_stats(model, held, until_step, lambda: steps[0]) == len(held) == 5
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    for step in range(3):
        steps[0] = step
        model(torch.randn(8, 1, 8, 8)).sum().backward()
        after = {k: v for k, v in model.state_dict().items() if "running" in k}
        for key in before:
            kept = torch.equal(before[key], after[key])
            is_held = key.startswith("bn1.") or key.startswith("layer1.")
            assert kept == (is_held and (not until_step or step < until_step)), (step, key)
    assert model.training and all(m.training for m in model.modules())  # the mode is restored
    model.eval()
    model(torch.randn(2, 1, 8, 8))
    assert not any(m.training for m in model.modules())
