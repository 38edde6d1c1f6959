"""Fine-tuning from pretrained weights that do not fit exactly, with 2 real gloo processes.

The acceptance case: the ResNet-18 recipe at torchvision's width (64) starts from a torchvision-format
ResNet-18 state dict (3 input channels, the ImageNet stem, a 1000-class fc; random weights, since
nothing can be downloaded here), saved as .pt and as .safetensors, on 1-channel MNIST-5k: every key but
the excluded head loads, and conv1 is adapted to one channel (the summed RGB filters). Then
`init_from.freeze_batchnorm` under ZeRO-3 through a kill and a resume, and under ZeRO-0 with
`init_from.unfreeze_at_step`: the frozen BatchNorm layers keep the file's running statistics (as long
as their parameters are frozen), the others learn theirs.
"""

from __future__ import annotations

import pytest
import torch

from pipeline import config, launch, models
from pipeline.checkpoint import commit, export
from pipeline.config import ConfigError, InitFromConfig
from pipeline.data import shards, sources
from pipeline.launch.plan import TrainingFailed, make_plan
from pipeline.training import finetune
from tests.helpers import read_jsonl

pytestmark = pytest.mark.dist

FROZEN = ["conv1.*", "bn1.*", "layer1.*"]  # the stem and the first stage: 5 BatchNorm layers
HELD_BN = ("bn1.", "layer1.")


def torchvision_resnet18(width: int = 64) -> dict[str, torch.Tensor]:
    """A state dict with torchvision's ResNet-18 keys and shapes (our ResNet18 follows its layout),
    with running statistics that are not the defaults, so that keeping them is visible."""
    torch.manual_seed(1)
    state = models.build("resnet18", {"width": width}, (3, 224, 224), 1000).state_dict()
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var")):
            value.uniform_(0.5, 1.5)
    return state


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    state = torchvision_resnet18()
    torch.save(state, root / "resnet18.pt")
    from safetensors.torch import save_file

    save_file(state, str(root / "resnet18.safetensors"))
    shards.write_prepared(sources.mnist5k(), root / "mnist5k", samples_per_shard=250, val_fraction=0.1)
    return root, state


def recipe(root, run_dir, weights, *extra):
    return config.load(
        "configs/resnet18-mnist5k.yaml",
        [
            f"data.train={root / 'mnist5k'}",
            f"run_dir={run_dir}",
            "data.batch_size=16",
            "data.num_workers=0",
            "model.args.width=64",
            "model.args.stem=imagenet",  # torchvision's 7x7 stride-2 conv1 and max-pool (28 px -> 7)
            f"init_from.path={weights}",
            "init_from.exclude=['fc.*']",
            "cluster.launcher=local",
            "precision=fp32",
            "optim.warmup_steps=0",
            "train.eval_every=0",
            "train.log_every=1",
            "checkpoint.keep_last=10",
            *extra,
        ],
    )


def assert_loaded(model, state):
    loaded = model.state_dict()
    assert torch.equal(loaded["conv1.weight"], state["conv1.weight"].sum(dim=1, keepdim=True))
    rest = [k for k in state if k != "conv1.weight" and not k.startswith("fc.")]
    assert len(rest) == len(state) - 3 and all(torch.equal(loaded[k], state[k]) for k in rest)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_torchvision_resnet18_weights_load_into_the_one_channel_recipe(pretrained, tmp_path, suffix):
    root, state = pretrained
    plan = make_plan(recipe(root, tmp_path / "run", root / f"resnet18{suffix}"))  # the preflight
    assert plan.spec.sample_shape[0] == 1 and plan.params_frozen == 0
    model = models.build("resnet18", plan.cfg.model.args, plan.spec.sample_shape, 10)
    info = finetune.apply_init(model, plan.cfg.init_from)
    assert info["adapted"] == ["conv1.weight: 3 -> 1 input channels (summed)"]
    assert info["excluded"] == ["fc.bias", "fc.weight"] and info["loaded"] == len(state) - 2
    assert_loaded(model, state)


def test_the_recipes_small_stem_is_told_to_use_the_imagenet_one(pretrained, tmp_path):
    root, _ = pretrained
    cfg = recipe(root, tmp_path / "run", root / "resnet18.pt", "model.args.stem=small")
    with pytest.raises(
        ConfigError, match=r"7x7 kernel in the file, 3x3 in the model.*model\.args\.stem=imagenet"
    ):
        make_plan(cfg)


def batchnorm_stats(weights, prefixes):
    return {
        k: v
        for k, v in weights.items()
        if k.endswith(("running_mean", "running_var")) and k.startswith(prefixes)
    }


@pytest.mark.timeout(600)
def test_frozen_batchnorm_keeps_the_files_statistics_through_a_zero3_resume(
    pretrained, tmp_path, monkeypatch
):
    root, state = pretrained
    run_dir = tmp_path / "run"
    extra = [
        "zero.stage=3",
        "train.max_steps=4",
        "checkpoint.every=2",
        "checkpoint.async_save=false",  # step 2 committed before the kill at step 3
        f"init_from.freeze={FROZEN}",
        "init_from.freeze_batchnorm=true",
    ]
    weights = root / "resnet18.safetensors"
    monkeypatch.setenv("PIPELINE_FAULTS", "kill@3:1")
    with pytest.raises(TrainingFailed):
        launch.train(make_plan(recipe(root, run_dir, weights, *extra)))
    monkeypatch.delenv("PIPELINE_FAULTS")
    launch.train(make_plan(recipe(root, run_dir, weights, *extra)))  # resumes from step 2

    events = read_jsonl(run_dir / "events.jsonl")
    assert [e["from_step"] for e in events if e["event"] == "resume"] == [2]
    first, restart = [e["init_from"] for e in events if e["event"] == "start"]
    assert first["adapted"] == ["conv1.weight: 3 -> 1 input channels (summed)"]
    assert first["excluded"] == ["fc.bias", "fc.weight"] and first["batchnorm_held"] == 5
    assert restart == {"batchnorm_held": 5}  # a resumed run takes its weights from its checkpoint

    held = batchnorm_stats(state, HELD_BN)
    learned = batchnorm_stats(state, ("layer2.", "layer3.", "layer4."))
    assert len(held) == 10
    fc = []
    for ckpt in commit.committed(run_dir / "checkpoints"):
        weights = export.consolidated_state_dict(ckpt)
        assert all(torch.equal(weights[k], v) for k, v in held.items())
        assert not any(torch.equal(weights[k], v) for k, v in learned.items())
        frozen = [k for k in state if k.startswith(("bn1.", "layer1.")) and "running" not in k]
        assert all(torch.equal(weights[k], state[k]) for k in frozen)
        assert torch.equal(weights["conv1.weight"], state["conv1.weight"].sum(dim=1, keepdim=True))
        fc.append(weights["fc.weight"])
    assert len(fc) == 2 and not torch.equal(fc[0], fc[1])


@pytest.mark.timeout(300)
def test_with_unfreeze_at_step_the_statistics_update_once_the_layers_train(digits_dir, tmp_path):
    state = torchvision_resnet18(width=8)
    weights = tmp_path / "resnet18-w8.pt"
    torch.save(state, weights)
    cfg = config.load(
        "configs/resnet18-mnist5k.yaml",
        [
            f"data.train={digits_dir}",
            f"run_dir={tmp_path / 'run'}",
            "data.batch_size=16",
            "data.num_workers=0",
            "model.args={width: 8, stem: imagenet}",
            f"init_from.path={weights}",
            "init_from.exclude=['fc.*']",
            f"init_from.freeze={FROZEN}",
            "init_from.freeze_batchnorm=true",
            "init_from.unfreeze_at_step=2",
            "zero.stage=0",
            "cluster.launcher=local",
            "precision=fp32",
            "optim.warmup_steps=0",
            "train.max_steps=4",
            "train.eval_every=0",
            "checkpoint.every=2",
            "checkpoint.keep_last=10",
        ],
    )
    launch.train(make_plan(cfg))
    held = batchnorm_stats(state, HELD_BN)
    step2, step4 = (
        export.consolidated_state_dict(c) for c in commit.committed(tmp_path / "run" / "checkpoints")
    )
    assert all(torch.equal(step2[k], v) for k, v in held.items())  # held while the layers got LR 0
    assert not any(torch.equal(step4[k], v) for k, v in held.items())  # then trained, statistics too


def test_freeze_batchnorm_without_a_frozen_batchnorm_is_refused_before_anything_starts(pretrained, tmp_path):
    root, _ = pretrained
    cfg = recipe(
        root,
        tmp_path / "run",
        root / "resnet18.pt",
        "init_from.freeze=[fc.*]",
        "init_from.freeze_batchnorm=true",
    )
    with pytest.raises(ConfigError, match=r"init_from\.freeze_batchnorm"):
        make_plan(cfg)
    assert not (tmp_path / "run").exists()
    assert InitFromConfig().adapt_input_channels and not InitFromConfig().freeze_batchnorm
