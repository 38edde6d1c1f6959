"""When the run's local Ray cluster does not come up (issue 16, finding 7: "The current node timed out
during startup" under load), the user gets one `error:` line naming what failed and what to try, and
exit 1 (the machine failed, not the config: not 2), instead of a 45-line traceback."""

import os
import sys

import pytest

from pipeline.launch import ray_local
from tests.helpers import REPO, run_cli

RAY_TIMEOUT = (
    "The current node timed out during startup. This could happen because some of the raylet failed "
    "to startup or the GCS has become overloaded."
)


def timed_out_during_startup(ray_params, head):
    """A RAY_START_HOOK: `ray start` calls it before it starts anything; it fails as Ray does."""
    raise Exception(RAY_TIMEOUT)


def test_a_head_that_fails_raises_ray_start_failed_naming_the_cause_and_the_log(tmp_path, monkeypatch):
    script = f"import sys; print('Traceback (most recent call last):'); sys.exit('Exception: {RAY_TIMEOUT}')"
    monkeypatch.setattr(ray_local, "_head_command", lambda *args: [sys.executable, "-c", script])
    made = []
    mkdtemp = ray_local.tempfile.mkdtemp
    monkeypatch.setattr(ray_local.tempfile, "mkdtemp", lambda **kw: made.append(mkdtemp(**kw)) or made[-1])
    with (
        pytest.raises(ray_local.RayStartFailed) as failed,
        ray_local.local_cluster(requested_ip=None, num_cpus=1, run_dir=tmp_path),
    ):
        pytest.fail("the cluster came up")
    message = str(failed.value)
    assert f"did not start: Exception: {RAY_TIMEOUT}" in message
    assert "Re-run the same command" in message and str(tmp_path / "logs" / "ray-head.log") in message
    assert len(made) == 1 and not os.path.exists(made[0])  # its temp dir (and token) removed


def test_a_head_that_never_comes_up_is_stopped_after_the_timeout(tmp_path, monkeypatch):
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(ray_local, "_head_command", lambda *args: hang)
    with (
        pytest.raises(ray_local.RayStartFailed, match="not up after 1 s"),
        ray_local.local_cluster(requested_ip=None, num_cpus=1, run_dir=tmp_path, timeout_s=1),
    ):
        pytest.fail("the cluster came up")


@pytest.mark.timeout(300)
def test_the_cli_says_what_failed_and_what_to_try_and_exits_1(digits_dir, tmp_path):
    hook = f"{__name__}.timed_out_during_startup"
    env = {
        "RAY_START_HOOK": hook,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    args = [f"data.train={digits_dir}", f"run_dir={tmp_path / 'run'}", "train.max_steps=10"]
    proc = run_cli("train", "configs/smoke.yaml", *args, "optim.warmup_steps=1", env=env)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 1, console[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "local Ray cluster did not start" in errors[0] and "timed out during startup" in errors[0]
    assert "Re-run the same command" in errors[0]
    assert "Traceback" not in console
    assert "timed out during startup" in (tmp_path / "run" / "logs" / "ray-head.log").read_text()
