"""The sbatch script `pipeline submit slurm --dry-run` renders, and the per-job Ray ports/temp dirs."""

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config
from pipeline.launch import slurm
from tests.helpers import run_cli

SMOKE = "configs/smoke.yaml"


def test_two_jobs_on_one_node_never_share_a_port_or_temp_dir():
    def claimed(job_id):
        env = slurm.job_ports(job_id)
        ports = {int(v) for k, v in env.items() if k.endswith("_PORT") and "WORKER" not in k}
        ports |= set(range(int(env["RAY_MIN_WORKER_PORT"]), int(env["RAY_MAX_WORKER_PORT"]) + 1))
        return ports, env["RAY_TMP_DIR"]

    # every pair of ids within JOB_SLOTS of each other (what can share a node at once), around a wrap
    window = range(12_345, 12_345 + slurm.JOB_SLOTS)
    claims = {job: claimed(job) for job in window}
    for a, b in itertools.combinations(window, 2):
        assert not claims[a][0] & claims[b][0], (a, b)
        assert claims[a][1] != claims[b][1]
    for ports, _ in claims.values():  # 9 fixed + the worker range; none in the ephemeral range
        assert len(ports) == slurm.PORTS_PER_JOB and min(ports) > 1024 and max(ports) < 32768
    # the documented limit: ids JOB_SLOTS apart share ports (not their temp dir)
    assert claimed(7)[0] == claimed(7 + slurm.JOB_SLOTS)[0]


def test_the_ports_helper_prints_shell_exports_the_script_can_eval():
    out = subprocess.run(
        [
            "bash",
            "-c",
            f'eval "$({sys.executable} -m pipeline.launch.slurm ports 42)"; echo $RAY_GCS_PORT $RAY_TMP_DIR',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    env = slurm.job_ports(42)
    assert out.stdout.split() == [env["RAY_GCS_PORT"], "/tmp/ray-job42"]


def test_dry_run_renders_a_script_that_bash_accepts(digits_dir, tmp_path):
    result = run_cli(
        "submit",
        "slurm",
        SMOKE,
        f"data.train={digits_dir}",
        f"run_dir={tmp_path / 'run'}",
        "slurm.partition=gpu",
        "slurm.nodes=2",
        "slurm.gpus_per_node=4",
        "slurm.time=02:00:00",
        "slurm.account=proj7",
        "slurm.signal_lead_s=300",
        "slurm.extra_sbatch=['--qos=high', 'constraint=a100']",
        "slurm.setup=['module load cuda/12.4']",
        "cluster.num_workers=8",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    script = result.stdout
    (tmp_path / "job.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for option in (
        "--nodes=2",
        "--cpus-per-task=4",  # 8 workers x 1 CPU over 2 nodes
        "--partition=gpu",
        "--gpus-per-node=4",
        "--time=02:00:00",
        "--account=proj7",
        "--signal=B:USR1@300",
        "--requeue",
        "--open-mode=append",
        "--qos=high",
        "--constraint=a100",
        f"--output={tmp_path / 'run' / 'slurm' / 'job-%j.out'}",
    ):
        assert f"#SBATCH {option}" in sbatch, option
    assert "module load cuda/12.4" in script and "{{" not in script.replace("{{...}}", "")
    assert str(tmp_path / "run" / "slurm" / "config.yaml") in script  # trains from the snapshot
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_submitting_a_local_launcher_config_is_a_usage_error(digits_dir, tmp_path):
    args = [f"data.train={digits_dir}", "cluster.launcher=local", f"run_dir={tmp_path}", "--dry-run"]
    result = run_cli("submit", "slurm", SMOKE, *args)
    assert result.returncode == 2 and "cluster.launcher=ray" in result.stderr


def test_render_uses_the_configured_node_ip_and_python(tmp_path):
    overrides = [f"run_dir={tmp_path}", "cluster.node_ip=127.0.0.2", "slurm.python=/opt/py/bin/python"]
    cfg = config.load(SMOKE, overrides)
    script = slurm.render(cfg, tmp_path)
    assert "HEAD_IP=127.0.0.2" in script and "PY=/opt/py/bin/python" in script
    with pytest.raises(ValueError):
        slurm.job_ports(-1)


def test_users_code_is_put_on_pythonpath_quoted(tmp_path, monkeypatch):
    code = tmp_path / "my code; rm -rf ~"  # a directory name the shell must not interpret
    code.mkdir()
    (code / "mydecode_for_slurm.py").write_text("def decode(sample):\n    return sample\n")
    monkeypatch.syspath_prepend(str(code))
    cfg = config.load(SMOKE, [f"run_dir={tmp_path / 'run'}", "data.decode=mydecode_for_slurm:decode"])
    script = slurm.render(cfg, tmp_path)
    (line,) = [x for x in script.splitlines() if x.startswith("export PYTHONPATH=")]
    assert line == f"export PYTHONPATH='{code}'${{PYTHONPATH:+:$PYTHONPATH}}"
    shown = subprocess.run(
        ["bash", "-c", f'set -u; unset PYTHONPATH; {line}; printf %s "$PYTHONPATH"'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown.stdout == str(code)
    assert "PYTHONPATH" not in slurm.render(config.load(SMOKE, [f"run_dir={tmp_path}"]), tmp_path)
    sys.modules.pop("mydecode_for_slurm", None)


def test_the_dry_run_names_the_directories_every_node_must_see(digits_dir, tmp_path):
    userpkg = Path(__file__).resolve().parents[1] / "userpkg"
    result = run_cli(
        "submit",
        "slurm",
        SMOKE,
        f"data.train={digits_dir}",
        f"run_dir={tmp_path / 'run'}",
        "model.name=userpkg.models:TinyNet",
        "model.args={}",
        "task.name=userpkg.tasks:SmoothClassify",
        "--dry-run",
        env={"PYTHONPATH": str(userpkg)},
    )
    assert result.returncode == 0, result.stderr
    assert f"export PYTHONPATH={userpkg}${{PYTHONPATH:+:$PYTHONPATH}}" in result.stdout
    assert f"your code from {userpkg} on every node" in result.stderr and "all nodes share" in result.stderr


def test_each_job_makes_its_own_private_ray_token_beside_its_log(tmp_path):
    """Ray 2.60's `ray start` makes no token: the script writes one (0600) per job where every node
    reads it, exports only its path, and removes it when the job's Ray stops."""
    run_dir = tmp_path / "run dir"  # a space: the path is quoted
    script = slurm.render(config.load(SMOKE, [f"run_dir={run_dir}"]), tmp_path)
    token_path = f"'{run_dir.resolve() / 'slurm' / '.ray-token-'}'\"$SLURM_JOB_ID\""
    assert f"export RAY_AUTH_TOKEN_PATH={token_path}\n" in script
    assert "unset RAY_AUTH_TOKEN" in script
    # made before the first `ray start`, with umask 077, and removed by stop_ray
    made = script.index("(umask 077 && mkdir -p")
    assert made < script.index("start --head")
    # the lines that make it, run: 256 random bits in hex, 0600, its dir made if missing
    making = script[made : script.index("\n\n", made)]
    token = tmp_path / "new dir" / ".ray-token-7"
    subprocess.run(["bash", "-c", making], env={**os.environ, "RAY_AUTH_TOKEN_PATH": str(token)}, check=True)
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text()) and token.stat().st_mode & 0o777 == 0o600
    assert 'rm -f "$RAY_AUTH_TOKEN_PATH"' in script[script.index("stop_ray() {") :]
    # the token is made in the job, not by `pipeline submit`: no token value in the script
    assert "RAY_AUTH_TOKEN=" not in script
