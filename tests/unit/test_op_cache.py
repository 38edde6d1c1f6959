"""DeepSpeed's JIT-built ops are cached per Python environment (issue 19): two checkouts on one machine
each keep their own build instead of rebuilding in turn; TORCH_EXTENSIONS_DIR still wins."""

import sys

from pipeline import engine


def test_each_environment_has_its_own_op_cache_and_the_users_choice_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(sys, "prefix", "/work/checkout-a/.venv")
    first = engine.op_cache_dir()
    monkeypatch.setattr(sys, "prefix", "/work/checkout-b/.venv")
    second = engine.op_cache_dir()
    assert first != second and first.parent == second.parent == tmp_path / "torch_extensions"
    monkeypatch.setattr(sys, "prefix", "/work/checkout-a/.venv")
    assert engine.op_cache_dir() == first  # stable: the same environment finds its build again

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    engine.use_environment_op_cache()
    assert engine.os.environ["TORCH_EXTENSIONS_DIR"] == str(first)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/opt/ops")
    engine.use_environment_op_cache()
    assert engine.os.environ["TORCH_EXTENSIONS_DIR"] == "/opt/ops"
