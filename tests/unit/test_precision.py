"""precision: auto picks bf16 only where the device computes it natively, and says why."""

from pathlib import Path

import pytest
import torch

from pipeline import config
from pipeline.engine import choose_precision, forced_bf16_warning, native_bf16


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_auto_is_bf16_with_native_support_and_fp32_without(device):
    precision, why = choose_precision("auto", native=True, device=device)
    assert precision == "bf16" and why.startswith("auto:") and "natively" in why
    precision, why = choose_precision("auto", native=False, device=device)
    assert precision == "fp32" and why.startswith("auto: not every worker's")
    assert ("GPU" if device.startswith("cuda") else "CPU") in why


@pytest.mark.parametrize("requested", ["bf16", "fp16", "fp32"])
def test_an_explicit_precision_is_kept_whatever_the_hardware(requested):
    for native in (True, False):
        assert choose_precision(requested, native=native, device="cpu") == (requested, "set in the config")


def test_forcing_bf16_without_native_support_warns():
    assert "precision=auto" in forced_bf16_warning("bf16", native=False, device="cpu")
    assert forced_bf16_warning("bf16", native=True, device="cpu") is None
    assert forced_bf16_warning("fp32", native=False, device="cpu") is None


def test_the_cpu_probe_reads_the_bf16_instructions(tmp_path):
    """On x86 Linux the answer is the AVX-512 BF16 / AMX flags of /proc/cpuinfo (torch's own
    `_is_mkldnn_bf16_supported` also says yes on AVX-512 CPUs that only emulate bf16)."""
    try:
        flags = next(
            set(line.partition(":")[2].split())
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this machine")
    assert native_bf16("cpu") == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_auto_is_the_default_and_every_recipe_uses_it():
    """No recipe forces bf16 (emulated bf16 fails or crawls on CPUs without it): auto, or fp32 where
    the recipe's comment says why (the PPO recipes: a 9k-parameter MLP gains nothing from bf16)."""
    from pathlib import Path

    assert config.load("configs/smoke.yaml", []).precision == "auto"
    assert config.Config.model_fields["precision"].default == "auto"
    for path in sorted(Path("configs").glob("*.yaml")):
        precision = config.load(str(path), []).precision
        if precision == "fp32":
            line = next(ln for ln in path.read_text().splitlines() if ln.startswith("precision:"))
            assert "#" in line, f"{path}: precision fp32 without a comment saying why"
        else:
            assert precision == "auto", path


def test_cuda_probe_without_cuda_is_false():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert native_bf16("cuda:0") is False
