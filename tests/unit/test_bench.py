"""The bench tables and the startup breakdown arithmetic."""

import pytest

from pipeline.bench import format_table, median, row
from pipeline.train.telemetry import startup_phases


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
