"""The real sbatch (slurm/local-cluster.sh) reads the rendered #SBATCH lines as the pipeline meant
them: a run name and run dir with spaces, quotes, '#', `$(...)` and backticks arrive whole, and every
directive after them (--requeue, --signal, --open-mode) is still read. The job is held and cancelled:
nothing runs."""

import re
import subprocess

import pytest

from pipeline import config
from pipeline.launch import slurm
from tests.slurm.test_slurm import job_field, slurm_cluster

pytestmark = pytest.mark.slurm
__all__ = ["slurm_cluster"]  # the module's fixture: a running local Slurm

NAME = "a \"b\" 'c' #d $(e) `f` {{g}} \\h"


def test_sbatch_reads_quoted_names_and_paths_whole_and_every_directive_after_them(tmp_path):
    run_dir = tmp_path / "run dir 'q' \"d\" #h $(x)"
    cfg = config.load("configs/smoke.yaml", ["slurm.signal_lead_s=45"])
    cfg.name, cfg.run_dir = NAME, str(run_dir)  # (an override is YAML, where '#' starts a comment)
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.render(cfg, tmp_path))
    out = subprocess.run(
        ["sbatch", "-v", "--hold", "--parsable", str(script)], capture_output=True, text=True, check=True
    )
    job_id = int(out.stdout.strip().split(";")[0])
    try:
        options = dict(re.findall(r"^sbatch: (\S[\w-]*)\s*: (.*)$", out.stderr, re.MULTILINE))
        assert options["job-name"] == NAME
        assert options["signal"] == "B:USR1@45" and options["requeue"] == "requeue"
        assert options["open-mode"] == "a" and options["time"] == "00:30:00"
        assert job_field(job_id, "JobName") is not None
        shown = subprocess.run(
            ["scontrol", "show", "job", str(job_id)], capture_output=True, text=True
        ).stdout
        assert f"StdOut={run_dir}/slurm/job-{job_id}.out\n" in shown
    finally:
        subprocess.run(["scancel", str(job_id)], check=False)
