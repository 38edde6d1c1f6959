"""The CLI contract: exit codes, messages that name the key, no side effects before validation."""

import time

from tests.helpers import run_cli


def test_unknown_key_exits_2_fast_with_no_side_effects(tmp_path, digits_dir):
    run_dir = tmp_path / "run"
    start = time.monotonic()
    # -X importtime lists every module imported: proves Ray (and DeepSpeed) never started.
    proc = run_cli(
        "train",
        "configs/smoke.yaml",
        f"data.train={digits_dir}",
        f"run_dir={run_dir}",
        "optim.lrr=1",
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    elapsed_s = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "optim.lrr" in proc.stderr and "did you mean 'optim.lr'" in proc.stderr
    assert elapsed_s < 5
    assert not run_dir.exists()
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "import time:" in line
    }
    assert "ray" not in imported and "deepspeed" not in imported and "wandb" not in imported
    assert "pipeline.config" in imported  # the check above looked at a real import list


def test_wrong_type_exits_2(tmp_path, digits_dir):
    proc = run_cli(
        "train",
        "configs/smoke.yaml",
        f"data.train={digits_dir}",
        f"run_dir={tmp_path / 'r'}",
        "train.max_steps=many",
    )
    assert proc.returncode == 2
    assert "'train.max_steps'" in proc.stderr and "integer" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_missing_shard_path_exits_2(tmp_path):
    proc = run_cli(
        "train", "configs/smoke.yaml", f"data.train={tmp_path / 'nowhere'}", f"run_dir={tmp_path / 'r'}"
    )
    assert proc.returncode == 2
    assert (
        "'data.train'" in proc.stderr and "nowhere" in proc.stderr and "pipeline data prepare" in proc.stderr
    )
    assert not (tmp_path / "r").exists()


def test_dry_run_prints_config_and_plan_without_side_effects(tmp_path, digits_dir):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "train",
        "configs/smoke.yaml",
        f"data.train={digits_dir}",
        f"run_dir={run_dir}",
        "--dry-run",
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "zero:\n  stage: 2" in proc.stdout  # the resolved config
    assert "2 worker(s)" in proc.stdout and "shards/worker [6, 6]" in proc.stdout
    assert "300 x 64 samples" in proc.stdout
    assert not run_dir.exists()
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "import time:" in line
    }
    assert "ray" not in imported and "deepspeed" not in imported


def test_data_prepare_and_inspect(tmp_path):
    out = tmp_path / "digits"
    proc = run_cli("data", "prepare", "digits", "--out", str(out), "--samples-per-shard", "300")
    assert proc.returncode == 0, proc.stderr
    assert "train: 1438 samples in 5 shard(s)" in proc.stdout
    proc = run_cli("data", "inspect", str(out))
    assert proc.returncode == 0 and "all shards verified" in proc.stdout
    (out / "train-000002.tar").write_bytes(b"truncated")
    proc = run_cli("data", "inspect", str(out))
    assert proc.returncode == 2 and "train-000002.tar" in proc.stderr
    proc = run_cli("data", "prepare", "digits", "--out", str(out))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


def test_unknown_source_exits_2(tmp_path):
    proc = run_cli("data", "prepare", "cifar", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "unknown data source" in proc.stderr


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("train", "data", "export"):
        assert command in proc.stdout
