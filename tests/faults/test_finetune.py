"""Fine-tuning from transfer-learned weights: pretrain on digits 0-4, fine-tune on 5-9 with 10% of
their labels; frozen weights stay frozen (and survive a resume under ZeRO-3); bad weight files are
refused before anything starts."""

import pickle

import pytest
import torch

from pipeline import config, launch, models
from pipeline.checkpoint import commit, export
from pipeline.config import ConfigError
from pipeline.data import shards, sources
from pipeline.launch.plan import TrainingFailed, make_plan
from tests.helpers import read_jsonl, run_cli

pytestmark = pytest.mark.faults

LOCAL = ["cluster.launcher=local", "train.eval_every=0", "checkpoint.keep_last=10"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The pretraining recipe on digits 0-4 (shortened), and the 5-9 fine-tuning data."""
    root = tmp_path_factory.mktemp("finetune")
    mnist = sources.mnist5k()
    shards.write_prepared(mnist, root / "d04", classes=[0, 1, 2, 3, 4], samples_per_shard=125)
    shards.write_prepared(
        mnist, root / "d59", classes=[5, 6, 7, 8, 9], train_fraction=0.1, samples_per_shard=25
    )
    cfg = config.load(
        "configs/pretrain-digits-0-4.yaml",
        [*LOCAL, f"data.train={root / 'd04'}", f"run_dir={root / 'pre'}", "train.max_steps=120"],
    )
    final = launch.train(make_plan(cfg))
    assert final["eval/accuracy"] > 0.9
    return root


def finetune_cfg(root, run_dir, *extra):
    return config.load(
        "configs/finetune-digits.yaml",
        [
            *LOCAL,
            f"data.train={root / 'd59'}",
            f"run_dir={run_dir}",
            f"init_from.path={root / 'pre'}",
            *extra,
        ],
    )


@pytest.mark.timeout(900)
def test_finetuning_beats_training_from_scratch(pretrained, tmp_path):
    assert shards.read_manifest(pretrained / "d59")["splits"]["train"]["samples"] == 200
    tuned = launch.train(make_plan(finetune_cfg(pretrained, tmp_path / "tuned")))
    scratch = launch.train(
        make_plan(
            finetune_cfg(
                pretrained,
                tmp_path / "scratch",
                "init_from.path=null",
                "init_from.freeze=[]",
                "init_from.unfreeze_at_step=0",
                "init_from.lr_mult={}",
            )
        )
    )
    print(
        f"\nfine-tuned from digits 0-4: {tuned['eval/accuracy']:.4f}; from scratch: "
        f"{scratch['eval/accuracy']:.4f} (digits 5-9, 200 labels, 40 steps)"
    )
    assert tuned["eval/accuracy"] > scratch["eval/accuracy"] + 0.02


@pytest.mark.timeout(900)
@pytest.mark.parametrize("unfreeze_at_step", [0, 12])
def test_frozen_weights_stay_frozen_through_a_zero3_resume(
    pretrained, tmp_path, monkeypatch, unfreeze_at_step
):
    run_dir = tmp_path / "run"
    extra = [
        f"init_from.unfreeze_at_step={unfreeze_at_step}",
        "zero.stage=3",
        "checkpoint.every=4",
        "train.max_steps=16",
        "train.log_every=4",
    ]
    monkeypatch.setenv("PIPELINE_FAULTS", "kill@7:1")
    with pytest.raises(TrainingFailed):
        launch.train(make_plan(finetune_cfg(pretrained, run_dir, *extra)))
    monkeypatch.delenv("PIPELINE_FAULTS")
    launch.train(make_plan(finetune_cfg(pretrained, run_dir, *extra)))  # resumes from step 4
    assert [e["from_step"] for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "resume"] == [4]

    model = models.build("cnn", {"channels": [32, 64]}, [1, 28, 28], 5)
    feature_params = [n for n, _ in model.named_parameters() if n.startswith("features.")]
    start = export.consolidated_state_dict(commit.committed(pretrained / "pre" / "checkpoints")[-1])
    heads = []
    for ckpt in commit.committed(run_dir / "checkpoints"):
        weights = export.consolidated_state_dict(ckpt)
        step = commit.read_manifest(ckpt)["step"]
        unchanged = all(torch.equal(weights[n], start[n]) for n in feature_params)
        frozen_then = unfreeze_at_step == 0 or step <= unfreeze_at_step
        assert unchanged == frozen_then, f"step {step}"
        heads.append(weights["head.3.weight"])
    assert len(heads) == 4 and not torch.equal(heads[0], heads[-1])  # while the new head trains

    # what the start summary and the LR panels show
    (start, restart) = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "start"]
    n_features = sum(p.numel() for n, p in model.named_parameters() if n in feature_params)
    n_all = sum(p.numel() for p in model.parameters())
    frozen_for_good = n_features if unfreeze_at_step == 0 else 0  # delayed ones train (at LR 0)
    assert start["params_frozen"] == restart["params_frozen"] == frozen_for_good
    assert start["params_trainable"] == n_all - frozen_for_good  # ZeRO-3 partitions: full counts
    assert start["resume_from"] is None and restart["resume_step"] == 4
    rows = {m["step"]: m for m in read_jsonl(run_dir / "metrics.jsonl") if "train/lr" in m}
    group_lrs = {s: [v for k, v in r.items() if k.startswith("train/lr/group")] for s, r in rows.items()}
    if unfreeze_at_step:  # the delayed features' groups at LR 0, then with everyone's LR
        assert 0.0 in group_lrs[8] and max(group_lrs[8]) > 0
        assert len(set(group_lrs[16])) == 1


def test_weights_that_do_not_fit_or_need_unpickling_are_refused(pretrained, tmp_path):
    with pytest.raises(ConfigError, match=r"'init_from'.*unexpected|missing|shape"):
        make_plan(finetune_cfg(pretrained, tmp_path / "r", "model.args.channels=[16,32]"))  # other widths
    with pytest.raises(ConfigError, match=r"init_from.freeze.*matches no parameter"):
        make_plan(finetune_cfg(pretrained, tmp_path / "r", "init_from.freeze=[backbone.*]"))

    class Evil:
        def __reduce__(self):
            return (print, ("this would have run",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"features.0.weight": Evil()}))
    proc = run_cli(
        "train",
        "configs/finetune-digits.yaml",
        *LOCAL,
        f"data.train={pretrained / 'd59'}",
        f"run_dir={tmp_path / 'evil-run'}",
        f"init_from={evil}",
    )
    assert (
        proc.returncode == 2
        and "arbitrary unpickling" in proc.stderr
        and "this would have run" not in proc.stdout
    )
    assert not (tmp_path / "evil-run").exists()

    exported = tmp_path / "pre.safetensors"
    from safetensors.torch import save_file

    weights = export.consolidated_state_dict(commit.committed(pretrained / "pre" / "checkpoints")[-1])
    save_file({k: v.contiguous() for k, v in weights.items()}, str(exported))
    plan = make_plan(finetune_cfg(pretrained, tmp_path / "st", f"init_from.path={exported}"))
    assert plan.params_trainable > 0
