"""A checkpoint directory from elsewhere cannot run code (issue 16, finding 1).

Real tiny checkpoints (ZeRO 0 fp32, ZeRO 2 and 3 bf16; local launcher, 2 steps) are copied and one
engine file of the copy is replaced by a valid-looking one that also carries a pickle payload; its
MANIFEST entry is updated, so integrity checks pass: whoever supplies a directory writes its MANIFEST
too. Every entry point that reads such a directory refuses it with exit 2 naming the file and the
type, and the payload (it would create a marker file) never runs. The real checkpoints still pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline import config, launch
from pipeline.checkpoint import commit, export, trust
from pipeline.config import ConfigError
from pipeline.files import sha256_file
from pipeline.launch.plan import TrainingFailed, make_plan
from pipeline.training import evaluator
from tests.helpers import run_cli

pytestmark = pytest.mark.faults

RUNS = {  # name: (ZeRO stage, precision, workers)
    "z0": (0, "fp32", 1),
    "z2": (2, "bf16", 1),
    "z3": (3, "bf16", 2),
}


def overrides(digits_dir: Path, run_dir: Path, name: str) -> list[str]:
    stage, precision, workers = RUNS[name]
    return [
        f"data.train={digits_dir}",
        f"run_dir={run_dir}",
        "model.args={channels: [4, 8]}",
        f"zero.stage={stage}",
        f"precision={precision}",
        "cluster.launcher=local",
        f"cluster.num_workers={workers}",
        "optim.warmup_steps=0",
        "train.max_steps=2",
        "train.eval_every=0",
    ]


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file: harmless, observable


@pytest.fixture(scope="module")
def runs(digits_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trust-runs")
    for name in RUNS:
        launch.train(make_plan(config.load("configs/smoke.yaml", overrides(digits_dir, root / name, name))))
    return root


def poisoned(run: Path, into: Path, file_name: str, marker: Path) -> Path:
    """A copy of run dir `run` whose newest commit has `file_name` (an engine file) carrying a payload,
    its MANIFEST updated to match. Returns the copy's commit dir."""
    shutil.copytree(run, into, ignore=shutil.ignore_patterns("wandb", ".launches", ".universal"))
    (ckpt,) = commit.committed(into / "checkpoints")
    target = ckpt / "engines" / "model" / commit.ENGINE_TAG / file_name
    states = torch.load(target, map_location="cpu", weights_only=False)  # our own file: trusted
    states["extra"] = Payload(marker)
    torch.save(states, target)
    manifest = json.loads((ckpt / commit.MANIFEST).read_text())
    rel = str(target.relative_to(ckpt))
    manifest["files"][rel] = {"bytes": target.stat().st_size, "sha256": sha256_file(target)}
    (ckpt / commit.MANIFEST).write_text(json.dumps(manifest, indent=2))
    commit.verify(ckpt)  # integrity holds: only trust is missing
    return ckpt


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "a checkpoint payload ran"


def refused(proc, file_name: str) -> bool:
    return proc.returncode == 2 and f"{file_name} needs io.open" in proc.stderr and "error:" in proc.stderr


@pytest.mark.timeout(600)
def test_real_checkpoints_pass_and_export_and_eval_still_work(runs, tmp_path):
    for name in RUNS:
        (ckpt,) = commit.committed(runs / name / "checkpoints")
        trust.check_tree(ckpt)
        weights = export.consolidated_state_dict(ckpt)
        assert weights and all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    proc = run_cli("export", str(runs / "z3"), "--out", str(tmp_path / "z3.pt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(torch.load(tmp_path / "z3.pt", weights_only=True)) == sorted(weights)
    proc = run_cli("eval", str(runs / "z0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval/accuracy" in json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(900)
def test_a_payload_in_a_checkpoint_dir_is_refused_by_every_entry_point(runs, digits_dir, tmp_path, marker):
    z0 = poisoned(runs / "z0", tmp_path / "evil-z0", "mp_rank_00_model_states.pt", marker)
    optim = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    z3 = poisoned(runs / "z3", tmp_path / "evil-z3", optim, marker)

    # init_from: checked while planning, so also under --dry-run, and nothing is started or written
    for ckpt, file_name in ((z0, "mp_rank_00_model_states.pt"), (z3, optim)):
        for dry in (["--dry-run"], []):
            run_dir = tmp_path / f"tuned-{ckpt.parent.parent.name}-{bool(dry)}"
            proc = run_cli(
                "train",
                "configs/smoke.yaml",
                *overrides(digits_dir, run_dir, "z0"),
                f"init_from={ckpt.parent.parent}",
                *dry,
            )
            assert refused(proc, file_name), (proc.returncode, proc.stderr[-3000:])
            assert not run_dir.exists()

    # resume=DIR (here another world size and ZeRO stage's files would be converted: never reached)
    proc = run_cli(
        "train", "configs/smoke.yaml", *overrides(digits_dir, tmp_path / "resumed", "z3"), f"resume={z3}"
    )
    assert refused(proc, optim), proc.stderr[-3000:]

    # pipeline eval and pipeline export of the copied run dirs
    proc = run_cli("eval", str(tmp_path / "evil-z3"))
    assert refused(proc, optim), proc.stderr[-3000:]
    out = tmp_path / "exported.pt"
    proc = run_cli("export", str(z0), "--out", str(out))
    assert refused(proc, "mp_rank_00_model_states.pt"), proc.stderr[-3000:]
    assert not out.exists()

    # task.score_classifier: checked while planning (exit 2), and by the GAN task's evaluator itself
    gan = config.load(
        "configs/dcgan-mnist5k.yaml",
        [
            f"data.train={digits_dir}",
            f"run_dir={tmp_path / 'gan'}",
            "cluster.launcher=local",
            f"task.score_classifier={tmp_path / 'evil-z3'}",
        ],
    )
    with pytest.raises(ConfigError, match=f"'task.score_classifier': .*{optim} needs io.open"):
        make_plan(gan)
    with pytest.raises(trust.UnsafeCheckpoint, match=f"{optim} needs io.open"):
        evaluator.load_classifier(str(tmp_path / "evil-z3"), "cpu")


@pytest.mark.timeout(600)
def test_deepspeeds_own_load_reads_tensors_only_also_in_a_run_dir_resumed_as_its_own(
    runs, digits_dir, tmp_path, marker
):
    """resume=auto trusts the run dir it continues, but a file there that changed (or a commit another
    writer put there) still cannot run code: DeepSpeed's load_checkpoint unpickles tensors only."""
    run_dir = tmp_path / "own"
    poisoned(runs / "z0", run_dir, "mp_rank_00_model_states.pt", marker)
    cfg = config.load(
        "configs/smoke.yaml", [*overrides(digits_dir, run_dir, "z0"), "train.max_steps=4", "resume=auto"]
    )
    with pytest.raises(TrainingFailed, match=r"mp_rank_00_model_states\.pt needs io\.open"):
        launch.train(make_plan(cfg))
