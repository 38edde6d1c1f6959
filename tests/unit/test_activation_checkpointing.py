"""`model.activation_checkpointing` (issue 19): which blocks it picks, errors naming the key, and the same
training with and without it (losses, weights and BatchNorm statistics bitwise), the model's names
and state_dict unchanged."""

import pytest
import torch
from torch.nn import functional

from pipeline import models
from pipeline.checkpoint import store
from pipeline.config import Config, ConfigError
from pipeline.training import activations


def test_true_picks_the_models_own_blocks_and_patterns_pick_the_outermost_match():
    resnet = models.build("resnet18", {}, [1, 28, 28], 10)
    assert activations.blocks(resnet, True) == [f"layer{s}.{b}" for s in range(1, 5) for b in (0, 1)]
    assert activations.blocks(resnet, ["layer2", "layer2.*"]) == ["layer2"]  # its blocks are inside it
    assert activations.blocks(resnet, False) == [] == activations.blocks(resnet, [])
    assert activations.blocks(models.build("gru", {}, [1, 28, 28], 10), True) == ["rnn"]


def test_a_model_without_blocks_of_its_own_and_a_pattern_that_matches_nothing_are_refused():
    cnn = models.build("cnn", {}, [1, 28, 28], 10)
    with pytest.raises(
        ConfigError, match=r"'model.activation_checkpointing'.*names no blocks.*features, head"
    ):
        activations.blocks(cnn, True)
    resnet = models.build("resnet18", {}, [1, 28, 28], 10)
    with pytest.raises(ConfigError, match=r"pattern 'layer5\.\*' matches no module.*close: layer"):
        activations.blocks(resnet, ["layer5.*"])


def _train(name, args, shape, setting, steps=3):
    torch.manual_seed(0)
    model = models.build(name, args, shape, 10)
    chosen = activations.apply(model, setting)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)  # dropout masks: drawn from here, and replayed when a block is recomputed
    data = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        x = torch.randn(6, *shape, generator=data)
        y = torch.randint(0, 10, (6,), generator=data)
        loss = functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model, chosen, losses


@pytest.mark.parametrize(
    ("name", "args"),
    [("resnet18", {"dropout": 0.2}), ("lstm", {"hidden_size": 32, "num_layers": 2, "dropout": 0.3})],
)
def test_checkpointed_blocks_train_bitwise_like_the_plain_model(name, args):
    plain, none, plain_losses = _train(name, args, [1, 28, 28], False)
    checkpointed, chosen, losses = _train(name, args, [1, 28, 28], True)
    assert not none and chosen
    assert losses == plain_losses  # == on floats: bitwise
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()  # BatchNorm buffers included
    for key, value in plain.state_dict().items():
        assert torch.equal(checkpointed.state_dict()[key], value), key  # running stats updated once
    block = checkpointed.get_submodule(chosen[0])
    assert isinstance(block, type(plain.get_submodule(chosen[0])))  # the same class, checkpointed
    assert type(block).__name__.startswith("Checkpointed")


def test_turning_it_on_at_a_resume_is_not_a_change_of_the_training():
    base = Config.model_validate({"model": {"name": "resnet18"}}).to_dict()
    on = Config.model_validate({"model": {"name": "resnet18", "activation_checkpointing": True}}).to_dict()
    assert store.config_changes(store.training_config(base), store.training_config(on)) == []
    wider = Config.model_validate({"model": {"name": "resnet18", "args": {"width": 2}}}).to_dict()
    assert store.config_changes(store.training_config(base), store.training_config(wider))
