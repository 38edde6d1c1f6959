"""Two runs on one run dir or one checkpoint dir (issue 16, finding 6): the second is refused with exit 2
naming the holder, before it writes anything; a checkpoint another config wrote is refused naming the
keys that differ, unless checkpoint.allow_config_change=true."""

import signal
import subprocess
import sys

import pytest

from pipeline import config, launch
from pipeline.launch.plan import make_plan
from tests.helpers import LOCAL_SMALL_RUN, read_jsonl, run_cli

pytestmark = pytest.mark.faults

BASE = [*LOCAL_SMALL_RUN, "train.max_steps=4"]


@pytest.mark.timeout(300)
def test_a_second_run_on_a_locked_run_dir_exits_2_naming_the_holder(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    code = (
        "import time; from pipeline.checkpoint import lock\n"
        f"with lock.hold({str(run_dir)!r}):\n"
        "    print('held', flush=True); time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_cli("train", "configs/smoke.yaml", *BASE, f"data.train={digits_dir}", f"run_dir={run_dir}")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"run dir {run_dir} is in use by another run: pid {holder.pid} on host" in proc.stderr
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (run_dir / "config.yaml").exists()  # refused before it wrote anything


@pytest.mark.timeout(300)
def test_a_checkpoint_dir_shared_by_two_configs_is_refused_naming_the_keys(digits_dir, tmp_path):
    shared = tmp_path / "shared-checkpoints"
    common = [*BASE, f"data.train={digits_dir}", f"checkpoint.dir={shared}"]
    launch.train(make_plan(config.load("configs/smoke.yaml", [*common, f"run_dir={tmp_path / 'a'}"])))
    other = [*common, f"run_dir={tmp_path / 'b'}", "optim.lr=0.01"]
    proc = run_cli("train", "configs/smoke.yaml", *other)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "was written by another config; it differs in optim.lr: 0.003 -> 0.01" in proc.stderr
    assert not (tmp_path / "b").exists()
    # resuming the same config with more steps is no config change; an explicit change is allowed
    more = [*common, f"run_dir={tmp_path / 'a'}", "train.max_steps=6"]
    assert launch.train(make_plan(config.load("configs/smoke.yaml", more)))["step"] == 6
    changed = [*other, "checkpoint.allow_config_change=true", "train.max_steps=7"]
    final = launch.train(make_plan(config.load("configs/smoke.yaml", changed)))
    assert final["step"] == 7
    assert [
        e["from_step"] for e in read_jsonl(tmp_path / "b" / "events.jsonl") if e["event"] == "resume"
    ] == [6]
