"""The bench tables, the startup breakdown arithmetic, and the `pipeline bench` CLI: every benchmark in
the package, its rows in --json, usage errors exit 2."""

import json
from pathlib import Path

import pytest
import torch

from pipeline import bench
from pipeline.bench import BENCHMARKS, BenchError, format_table, median, row
from pipeline.training.telemetry import startup_phases
from tests.helpers import run_cli


def test_rows_carry_their_ratio_and_format_as_a_table():
    rows = [row("ddp", 0.02, "s/step"), row("pipeline ZeRO-0", 0.021, "s/step", 0.02)]
    assert rows[0]["ratio"] is None and rows[1]["ratio"] == pytest.approx(1.05)
    table = format_table("--- overhead", rows).splitlines()
    assert table[0] == "--- overhead" and table[-1].split()[-1] == "1.050"
    assert median([3.0, 1.0, 2.0]) == 2.0


def test_startup_phases_add_up_to_the_whole_startup():
    marks = {
        "process_start": 100.0,
        "launch": 102.5,
        "ray_ready": 106.0,
        "worker": 109.0,
        "engines": 111.0,
        "loop": 112.0,
        "first_batch_wait": 0.25,
        "first_step": 113.0,
    }
    phases = startup_phases(marks)
    assert phases == {
        "startup_s": 13.0,
        "cli_and_plan_s": 2.5,
        "ray_start_s": 3.5,
        "worker_group_s": 3.0,
        "deepspeed_init_s": 2.0,
        "data_and_tracking_s": 1.0,
        "first_batch_s": 0.25,
        "first_step_s": 0.75,
    }
    # the local launcher has no Ray: its Ray phase is 0
    local = startup_phases({k: v for k, v in marks.items() if k != "ray_ready"})
    assert local["ray_start_s"] == 0 and local["worker_group_s"] == 6.5


def _bench_rows(path: Path) -> list[dict]:
    rows = json.loads(path.read_text())
    assert rows and all(set(r) == {"name", "value", "unit", "baseline", "ratio"} for r in rows)
    return rows


def test_bench_loader_writes_its_rows_to_json_outside_a_checkout(tmp_path):
    out = tmp_path / "loader.json"
    # cwd outside the repository: the benchmark lives in the package, not in a script of the checkout
    proc = run_cli(
        "bench",
        "loader",
        "--samples",
        "400",
        "--size",
        "16x16",
        "--json",
        str(out),
        cwd=tmp_path,
        timeout_s=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _bench_rows(out)
    assert [r["name"][:3] for r in rows[:4]] == ["(a)", "(b)", "(c)", "(d)"]
    assert rows[1]["ratio"] == pytest.approx(rows[1]["value"] / rows[0]["value"])
    by_name = {r["name"]: r for r in rows[4:]}
    assert by_name["loader b/a"]["baseline"] == rows[0]["value"]
    assert (
        by_name["loader d/c"]["value"] == rows[3]["value"]
        and by_name["loader d/c"]["baseline"] == rows[2]["value"]
    )
    for name in ("loader peak RSS 10x data", "loader consumer peak RSS 10x data"):  # MB with 10x and 1x data
        assert by_name[name]["unit"] == "MB" and by_name[name]["baseline"] > 0
    assert "--- loader" in proc.stdout and "b/a = " in proc.stdout and "CPU us per sample" in proc.stdout


def test_bench_checkpoint_writes_its_rows_to_json(tmp_path):
    out = tmp_path / "checkpoint.json"
    args = ["bench", "checkpoint", "--params-m", "0.2", "--dir", str(tmp_path), "--json", str(out)]
    proc = run_cli(*args, cwd=tmp_path, timeout_s=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _bench_rows(out)
    assert rows[0]["name"] == "dd (fdatasync)" and rows[1]["baseline"] == rows[0]["value"]
    assert {r["unit"] for r in rows} == {"MB/s", "s"}
    assert "--- checkpoint" in proc.stdout and "model: 0.2 M parameters" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # its checkpoints are cleaned up


def test_bench_unknown_name_exits_2_with_the_known_names():
    proc = run_cli("bench", "loader", "nope")
    assert proc.returncode == 2
    assert "'nope'" in proc.stderr and ", ".join(BENCHMARKS) in proc.stderr


def test_bench_unknown_recipe_exits_2_naming_the_benchmark():
    proc = run_cli("bench", "recipes", "--recipes", "cnn,lstm")
    assert proc.returncode == 2
    assert "'lstm' is no recipe of bench recipes" in proc.stderr and "lstm-rows" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bench_gpu_without_cuda_exits_2_before_anything_runs(tmp_path):
    proc = run_cli("bench", "loader", "gpu", "--data", str(tmp_path / "data"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "needs CUDA" in proc.stderr
    assert "--- loader" not in proc.stdout and not (tmp_path / "data").exists()


def test_bench_help_lists_every_benchmark_with_what_it_measures():
    proc = run_cli("bench", "--help", env={"COLUMNS": "200"})
    assert proc.returncode == 0
    lines = [" ".join(line.strip(" │").split()) for line in proc.stdout.splitlines()]
    for name, what in BENCHMARKS.items():
        assert f"{name} {what}" in lines, f"{name} is not listed in `pipeline bench --help`"


def test_find_config_names_the_recipe_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "REPO", tmp_path / "site-packages")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BenchError, match=r"configs/smoke\.yaml.*checkout"):
        bench.find_config("smoke")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "smoke.yaml").write_text("name: smoke\n")
    assert bench.find_config("smoke") == tmp_path / "configs" / "smoke.yaml"


def test_bench_memory_measures_activation_checkpointing_in_fresh_processes():
    from pipeline.bench import memory

    # 128 px, batch 8: the activations are tensors of MBs, each its own mapping (the child's malloc mmap
    # threshold is 1 MiB); at 64 px, batch 4, many sat in the heap and the ratio once read 1.002
    rows = memory.run("resnet18", side=128, batch=8, steps=1, echo=lambda _: None)
    by_name = {r["name"]: r for r in rows}
    peak = by_name["memory resnet18 activation checkpointing"]  # the row name issue 19 keeps
    # at this size the process's peak may be set before training (imports, the first conv): not more
    assert peak["unit"] == "MiB" and peak["baseline"] >= peak["value"] > 0
    activation = by_name["memory resnet18 activation checkpointing: activation memory (goal ratio <= 0.7)"]
    assert 0 < activation["ratio"] < 1  # the checkpointed blocks' activations are not kept
    assert by_name["memory resnet18 activation checkpointing: blocks checkpointed"]["value"] == 8
