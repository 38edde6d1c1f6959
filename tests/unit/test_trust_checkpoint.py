"""Checkpoint files load tensors only (pipeline/checkpoint/trust.py): a pickle that would run code is
refused naming the file and the type, before any loader sees it and also when a loader (ours or
DeepSpeed's, in this process or in the ds_to_universal subprocess) asks torch for weights_only=False.

The payloads are harmless: unpickling one would create a marker file, which must never appear."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import trust, universal


class Payload:
    """Unpickled without restriction, this creates the file `marker` (the observable 'code ran')."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def deepspeed_like_states() -> dict:
    """What a ZeRO 1-3 optimizer-states file holds beyond tensors (see trust.ALLOWED)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return {
        "optimizer_state_dict": {
            "loss_scaler": LossScaler(1),
            "zero_stage": ZeroStageEnum.gradients,
            "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
            "fp16_scaler": DynamicLossScaler(2.0**16, 1000, 1, 2, False),
            "state": {0: {"exp_avg": torch.zeros(4), "step": torch.tensor(3.0)}},
        },
        "ds_version": "0.19.8",
    }


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "a checkpoint payload ran"


def test_allowed_deepspeed_types_and_tensors_pass_the_check(tmp_path, marker):
    states = tmp_path / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    states.parent.mkdir()
    torch.save(deepspeed_like_states(), states)
    (tmp_path / "latest").write_text("state")
    (tmp_path / "zero_to_fp32.py").write_text("raise SystemExit('never run by the pipeline')\n")
    trust.check_tree(tmp_path)
    loaded = trust.load(states)
    assert type(loaded["optimizer_state_dict"]["loss_scaler"]).__name__ == "LossScaler"
    assert loaded["optimizer_state_dict"]["param_slice_mappings"][0]["w"].numel == 4


def test_a_payload_in_a_torch_file_is_refused_naming_the_file_and_the_type(tmp_path, marker):
    states = deepspeed_like_states()
    states["extra"] = Payload(marker)
    bad = tmp_path / "state" / "mp_rank_00_model_states.pt"
    bad.parent.mkdir()
    torch.save(states, bad)
    torch.save({"w": torch.ones(2)}, tmp_path / "state" / "a_good_one.pt")
    with pytest.raises(trust.UnsafeCheckpoint, match=r"mp_rank_00_model_states\.pt needs io\.open") as e:
        trust.check_tree(tmp_path)
    assert "weights_only=False" not in str(e.value)  # never torch's advice to load it anyway
    with pytest.raises(trust.UnsafeCheckpoint, match="io.open"):
        trust.load(bad)


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_raw_pickles_and_unreadable_files_are_refused_whatever_their_name(tmp_path, marker, protocol):
    """torch.load reads any file it is given, so names do not exempt a file (but .json/.py/latest)."""
    raw = tmp_path / "notes.txt"
    raw.write_bytes(pickle.dumps(Payload(marker), protocol=protocol))
    with pytest.raises(trust.UnsafeCheckpoint, match=r"notes\.txt"):
        trust.check_tree(tmp_path)
    raw.write_bytes(b"not a pickle")
    with pytest.raises(trust.UnsafeCheckpoint, match=r"notes\.txt does not load as tensors only"):
        trust.check_tree(tmp_path)


def test_tensors_only_overrides_deepspeeds_weights_only_false(tmp_path, marker):
    """Check-then-load leaves a window (the file may change after the check): inside tensors_only
    even DeepSpeed's own reader, which asks torch for weights_only=False, unpickles tensors only."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    bad = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": Payload(marker)}, bad)
    good = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save(deepspeed_like_states(), good)
    reader = TorchCheckpointEngine()
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # a user's setting does not reopen the door
    try:
        with trust.tensors_only():
            assert reader.load(str(good), map_location="cpu")["ds_version"] == "0.19.8"
        with (
            pytest.raises(trust.UnsafeCheckpoint, match="a checkpoint file needs io.open"),
            trust.tensors_only(),
        ):
            reader.load(str(bad), map_location="cpu")
        named = r"mp_rank_00_model_states\.pt needs io\.open"  # the dir given: the file is found, named
        with pytest.raises(trust.UnsafeCheckpoint, match=named), trust.tensors_only(tmp_path):
            reader.load(str(bad), map_location="cpu")
        assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"
        assert trust.FORCE not in os.environ  # restored: the block ends the override
    finally:
        del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]


def test_the_converter_subprocess_loads_tensors_only(tmp_path, marker):
    """trust.command runs a module (ds_to_universal) with every torch.load forced to tensors only."""
    bad = tmp_path / "bad.pt"
    torch.save({"extra": Payload(marker)}, bad)
    (tmp_path / "loader.py").write_text(
        "import sys, torch\nprint(sorted(torch.load(sys.argv[1], weights_only=False)))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        trust.command("loader", str(bad)), capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode != 0 and "UnsafeCheckpoint" in proc.stderr and "io.open" in proc.stderr
    good = tmp_path / "good.pt"
    torch.save(deepspeed_like_states(), good)
    proc = subprocess.run(
        trust.command("loader", str(good)), capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0 and "optimizer_state_dict" in proc.stdout, proc.stderr[-2000:]
    assert sys.executable == trust.command("x")[0]


def test_a_universal_cache_beside_a_checkpoint_is_checked_before_it_is_loaded(tmp_path, marker):
    """resume at another world size loads `.universal/step_X/<engine>/` beside the checkpoint: for a
    checkpoint from elsewhere, that cache came from there too."""
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    cached = universal.universal_dir(ckpt, "model") / universal.UNIVERSAL_TAG / "zero" / "w"
    cached.mkdir(parents=True)
    torch.save({"param": torch.ones(2), "extra": Payload(marker)}, cached / "fp32.pt")
    with pytest.raises(trust.UnsafeCheckpoint, match=r"zero/w/fp32\.pt needs io\.open"):
        universal.convert(ckpt, "model")
