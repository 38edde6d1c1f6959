"""The recipe models (resnet, lstm/gru, dcgan, autoencoder, vae): shapes, gradients, torchvision layout
and config errors. Tiny widths keep the whole file to a few seconds on CPU."""

import pytest
import torch

from pipeline import models
from pipeline.config import ConfigError
from pipeline.models.gan import upsampling_steps

IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
TINY_ARGS = {
    "resnet18": {"width": 4},
    "resnet34": {"width": 4},
    "resnet50": {"width": 4},
    "lstm": {"hidden_size": 8},
    "gru": {"hidden_size": 8},
    "dcgan": {"latent_dim": 8, "base_channels": 4},
    "autoencoder": {"latent_dim": 4, "channels": [4, 8]},
    "vae": {"latent_dim": 4, "channels": [4, 8]},
}
NEW_MODELS = list(TINY_ARGS)


def assert_finite_grads(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


# ---- resnet -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_resnet_classifies_any_image_size_and_channel_count(name, shape):
    args = {**TINY_ARGS[name], "dropout": 0.1, "activation": "silu"}
    model = models.build(name, args, shape, 10)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert_finite_grads(model)


def torchvision_resnet_keys(convs_per_block: int, depths: tuple[int, ...]) -> list[str]:
    """torchvision's ResNet state_dict keys, in order, written out from its layout."""

    def bn(prefix: str) -> list[str]:
        return [
            f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        ]

    keys = ["conv1.weight", *bn("bn1")]
    for stage, depth in enumerate(depths, start=1):
        for block in range(depth):
            prefix = f"layer{stage}.{block}"
            for k in range(1, convs_per_block + 1):
                keys += [f"{prefix}.conv{k}.weight", *bn(f"{prefix}.bn{k}")]
            # the first block of a stage changes stride (layer2-4) or width (bottleneck layer1)
            if block == 0 and (stage > 1 or convs_per_block == 3):
                keys += [f"{prefix}.downsample.0.weight", *bn(f"{prefix}.downsample.1")]
    return [*keys, "fc.weight", "fc.bias"]


@pytest.mark.parametrize(
    ("name", "n_params", "convs_per_block", "depths"),
    [("resnet18", 11_689_512, 2, (2, 2, 2, 2)), ("resnet50", 25_557_032, 3, (3, 4, 6, 3))],
)
def test_resnet_matches_torchvision_layout(name, n_params, convs_per_block, depths):
    model = models.build(name, {"stem": "imagenet"}, (3, 224, 224), 1000)
    assert models.count_parameters(model) == (n_params, 0)
    keys = list(model.state_dict())
    assert keys == torchvision_resnet_keys(convs_per_block, depths)
    assert {"layer1.0.conv1.weight", "layer4.1.bn2.running_var", "fc.weight"} <= set(keys)
    if name == "resnet50":
        assert {"layer1.0.downsample.0.weight", "layer1.0.conv3.weight"} <= set(keys)
        assert model.state_dict()["layer4.0.conv2.weight"].shape == (512, 512, 3, 3)
    assert model.state_dict()["conv1.weight"].shape == (64, 3, 7, 7)


def test_resnet_stem_auto_keeps_small_images_full_size():
    small = models.build("resnet18", {"width": 4}, (1, 28, 28), 10)
    assert small.stem == "small"
    assert small.conv1(torch.randn(1, 1, 28, 28)).shape == (1, 4, 28, 28)
    assert isinstance(small.maxpool, torch.nn.Identity)
    large = models.build("resnet18", {"width": 4}, (3, 96, 96), 10)
    assert large.stem == "imagenet"
    assert large.conv1(torch.randn(1, 3, 96, 96)).shape == (1, 4, 48, 48)


def test_resnet_zero_init_residual_starts_blocks_as_identity():
    model = models.build("resnet50", {"width": 4}, (3, 32, 32), 10)
    last_bn_scales = [b.bn3.weight.detach() for stage in (model.layer1, model.layer4) for b in stage]
    assert all(torch.count_nonzero(w) == 0 for w in last_bn_scales)
    off = models.build("resnet18", {"width": 4, "zero_init_residual": False}, (3, 32, 32), 10)
    assert torch.equal(off.layer1[0].bn2.weight.detach(), torch.ones(4))


def test_resnet_rejects_an_unknown_stem():
    with pytest.raises(ConfigError, match="stem"):
        models.build("resnet18", {"stem": "tiny"}, (3, 32, 32), 10)


# ---- lstm / gru ---------------------------------------------------------------------------------------

SERIES_CASES = [  # (input_shape, batch, T, F)
    ((1, 8, 8), torch.randn(3, 1, 8, 8), 8, 8),
    ((3, 8, 6), torch.randn(3, 3, 8, 6), 8, 18),  # image rows: H steps of C*W features
    ((12, 4), torch.randn(3, 12, 4), 12, 4),
    ((12,), torch.randn(3, 12), 12, 1),
]


@pytest.mark.parametrize("layers_dirs", [(1, False), (2, False), (2, True)], ids=["1", "2", "2bi"])
@pytest.mark.parametrize("case", SERIES_CASES, ids=lambda c: "x".join(map(str, c[0])))
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_recurrent_last_classifies_the_sequence(name, case, layers_dirs):
    shape, x, _, _ = case
    num_layers, bidirectional = layers_dirs
    args = {**TINY_ARGS[name], "num_layers": num_layers, "bidirectional": bidirectional, "dropout": 0.2}
    model = models.build(name, args, shape, 5)
    out = model(x)
    assert out.shape == (3, 5)
    out.sum().backward()
    assert_finite_grads(model)


@pytest.mark.parametrize("case", SERIES_CASES, ids=lambda c: "x".join(map(str, c[0])))
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_recurrent_sequence_predicts_every_step(name, case):
    shape, x, steps, features = case
    args = {**TINY_ARGS[name], "output": "sequence", "num_layers": 2}
    tagger = models.build(name, {**args, "bidirectional": True}, shape, 5)
    assert tagger(x).shape == (3, steps, 5)
    forecaster = models.build(name, args, shape, 0)  # num_classes 0: predict the features themselves
    out = forecaster(x)
    assert out.shape == (3, steps, features)
    out.sum().backward()
    assert_finite_grads(forecaster)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_bidirectional_last_joins_both_directions_final_states(name):
    model = models.build(name, {**TINY_ARGS[name], "bidirectional": True, "dropout": 0.0}, (6, 3), 2).eval()
    x = torch.randn(2, 6, 3)
    _, state = model.rnn(x)
    h_n = state[0] if name == "lstm" else state
    expected = model.head(torch.cat([h_n[-2], h_n[-1]], dim=-1))  # last layer: forward, backward
    torch.testing.assert_close(model(x), expected)


def test_recurrent_rejects_impossible_modes():
    with pytest.raises(ConfigError, match="num_classes"):
        models.build("lstm", {"output": "last"}, (12, 4), 0)
    with pytest.raises(ConfigError, match="sees the future"):
        models.build("gru", {"output": "sequence", "bidirectional": True}, (12, 4), 0)
    with pytest.raises(ConfigError, match="output"):
        models.build("gru", {"output": "all"}, (12, 4), 3)


# ---- dcgan --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
def test_dcgan_generates_the_data_shape_and_scores_it(shape):
    gan = models.build("dcgan", {**TINY_ARGS["dcgan"], "dropout": 0.1}, shape, 0)
    fake = gan(torch.randn(4, 8))
    assert fake.shape == (4, *shape)
    assert float(fake.detach().abs().max()) <= 1.0
    logits = gan.discriminator(fake)
    assert logits.shape == (4,)
    logits.sum().backward()
    assert_finite_grads(gan)
    assert gan.sample(3).shape == (3, *shape)
    assert gan.generator.latent_dim == 8  # the GAN task reads it off the generator engine


def test_dcgan_layout_and_init():
    gan = models.build("dcgan", TINY_ARGS["dcgan"], (1, 28, 28), 0)
    assert upsampling_steps(28) == 2 and upsampling_steps(32) == 3 and upsampling_steps(8) == 1
    assert gan.generator.project[1].unflattened_size == (8, 7, 7)  # 7 -> 14 -> 28, no crop needed
    first_d_layers = [type(m).__name__ for m in gan.discriminator.features[:3]]
    assert first_d_layers == ["Conv2d", "LeakyReLU", "Conv2d"]  # no BatchNorm on the first layer
    convs = [m for m in gan.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    weights = torch.cat([m.weight.detach().flatten() for m in convs])
    assert abs(float(weights.mean())) < 0.01 and 0.01 < float(weights.std()) < 0.03
    bn_scale = torch.cat([m.weight.detach() for m in gan.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    assert abs(float(bn_scale.mean()) - 1.0) < 0.02


def test_dcgan_crops_odd_sizes_exactly():
    gan = models.build("dcgan", TINY_ARGS["dcgan"], (3, 30, 20), 0)
    assert gan(torch.randn(2, 8)).shape == (2, 3, 30, 20)


# ---- autoencoder / vae --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
def test_autoencoder_reconstructs_the_input_shape(shape):
    model = models.build("autoencoder", {**TINY_ARGS["autoencoder"], "dropout": 0.1}, shape, 0)
    x = torch.randn(3, *shape)
    z = model.encode(x)
    assert z.shape == (3, 4)
    x_hat = model(x)
    assert x_hat.shape == x.shape
    torch.nn.functional.mse_loss(x_hat, x).backward()
    assert_finite_grads(model)
    assert model.decode(z).shape == x.shape


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
def test_vae_returns_reconstruction_and_posterior(shape):
    model = models.build("vae", TINY_ARGS["vae"], shape, 0)
    x = torch.randn(3, *shape)
    x_hat, mu, logvar = model(x)
    assert x_hat.shape == x.shape and mu.shape == (3, 4) and logvar.shape == (3, 4)
    kl = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())
    (torch.nn.functional.mse_loss(x_hat, x) + kl).backward()
    assert_finite_grads(model)
    model.eval()
    with torch.no_grad():
        x_hat_eval, mu_eval, _ = model(x)
        torch.testing.assert_close(x_hat_eval, model.decode(mu_eval))  # eval decodes z = mu
    seeded = [model.sample(5, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    assert seeded[0].shape == (5, *shape)
    torch.testing.assert_close(seeded[0], seeded[1])


def test_autoencoder_handles_more_stages_than_the_image_can_halve():
    model = models.build("autoencoder", {"channels": [4, 4, 4, 4, 4]}, (1, 8, 8), 0)  # 8->4->2->1->1->1
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 1, 8, 8)


# ---- config errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "typo", "meant"),
    [
        ("resnet18", "widht", "width"),
        ("resnet34", "stme", "stem"),
        ("resnet50", "zero_init_residuals", "zero_init_residual"),
        ("lstm", "hiden_size", "hidden_size"),
        ("gru", "num_layer", "num_layers"),
        ("dcgan", "latent_dims", "latent_dim"),
        ("autoencoder", "chanels", "channels"),
        ("vae", "latentdim", "latent_dim"),
    ],
)
def test_unknown_args_get_a_did_you_mean(name, typo, meant):
    with pytest.raises(ConfigError, match=rf"model\.args\.{typo}.*did you mean 'model\.args\.{meant}'"):
        models.check_args(name, {typo: 1})


def test_recurrent_nets_do_not_take_a_cell_arg():
    with pytest.raises(ConfigError, match=r"model\.args\.cell"):
        models.check_args("lstm", {"cell": "gru"})


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("resnet18", "activation"),
        ("resnet50", "activation"),
        ("dcgan", "g_activation"),
        ("dcgan", "d_activation"),
        ("autoencoder", "activation"),
        ("vae", "activation"),
    ],
)
def test_bad_activation_is_rejected(name, key):
    with pytest.raises(ConfigError, match=rf"model\.args\.{key}.*not one of"):
        models.check_args(name, {key: "swish2"})


def test_every_new_model_is_registered():
    assert set(NEW_MODELS) <= set(models.REGISTRY)
