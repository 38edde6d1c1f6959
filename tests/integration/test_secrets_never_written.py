"""Issue 16, finding 3 (acceptance 2): credentials given to a run never reach a file, a log, W&B or
Ray. A 2-worker training on the in-process Ray cluster, with storage_options credentials (checkpoints
on a real S3 API: moto's server on 127.0.0.1) and WANDB_API_KEY set to unique markers; then the run
dir, the W&B offline files, this run's Ray session dir and everything printed hold none of them, while
the workers did get them (by inheritance: their process environment, never Ray's runtime_env)."""

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from tests.helpers import REPO, read_jsonl

pytestmark = pytest.mark.integration


def _markers() -> dict[str, str]:
    tag = uuid.uuid4().hex[:12]
    return {name: f"MARK{name.upper()}{tag}" for name in ("key", "secret", "datakey", "argv", "wandb")}


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def _holding(paths: list[Path], markers: dict[str, str]) -> list[str]:
    found = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError:  # a socket or a file Ray removed meanwhile
            continue
        found += [f"{path}: {name}" for name, value in markers.items() if value.encode() in data]
    return found


class _Watcher(threading.Thread):
    """Polls the run's processes: keeps the environment of its Ray Train workers (inherited, or what
    Ray put in it), and hard-links every file of a Ray temp dir the run names (`--temp-dir=`, which
    the run removes at its end) into `saved`, so the test reads what Ray wrote, not the run's
    scrubbed copy."""

    def __init__(self, root_pid: int, saved: Path) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.saved, self.envs, self.temp_dirs, self.done = root_pid, saved, {}, set(), False

    def run(self) -> None:
        while not self.done:
            try:
                procs = psutil.Process(self.root_pid).children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    cmdline = proc.cmdline()
                    if "RayTrainWorker" in " ".join(cmdline) and proc.pid not in self.envs:
                        self.envs[proc.pid] = proc.environ()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                self.temp_dirs |= {Path(a.split("=", 1)[1]) for a in cmdline if a.startswith("--temp-dir=")}
            self._link()
            time.sleep(0.5)

    def _link(self) -> None:
        for temp_dir in list(self.temp_dirs):
            for path in list(temp_dir.rglob("*")) if temp_dir.is_dir() else []:
                target = self.saved / temp_dir.name / path.relative_to(temp_dir)
                if path.is_file() and not path.is_symlink() and not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with contextlib.suppress(OSError):  # removed meanwhile
                        os.link(path, target)


@pytest.mark.timeout(600)
def test_credentials_never_written_logged_or_sent_to_ray(digits_dir, tmp_path, s3_endpoint):
    import s3fs

    marks = _markers()
    # moto accepts any credentials: the markers are the run's real ones
    options = {"key": marks["key"], "secret": marks["secret"], "endpoint_url": s3_endpoint}
    bucket = f"secrets-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir(bucket)
    tree = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    tree["data"].update(train=str(digits_dir), storage_options={"key": marks["datakey"]})
    tree["checkpoint"].update(dir=f"s3://{bucket}/run", storage_options=options)
    tree["train"].update(max_steps=6, log_every=2, eval_every=0)
    tree["optim"]["warmup_steps"] = 1
    tree["model"]["args"]["channels"] = [8, 16]
    tree["tracking"]["wandb"]["mode"] = "offline"
    tree["precision"] = "fp32"
    run_dir = tmp_path / "run"
    tree["run_dir"] = str(run_dir)
    config = tmp_path / "secret-run.yaml"  # in the config file: the command line is visible to `ps`
    config.write_text(yaml.safe_dump(tree))

    env = {**os.environ, "WANDB_API_KEY": marks["wandb"], "WANDB_MODE": "offline"}
    env.pop("PIPELINE_SECRETS", None)
    # one credential as an override: `ps` shows it, but nothing the run writes may quote it
    override = f"data.storage_options.password={marks['argv']}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", str(config), override],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watcher = _Watcher(proc.pid, tmp_path / "ray-files")
    watcher.start()
    stdout, stderr = proc.communicate(timeout=540)
    watcher.done = True
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]

    # The workers had what they needed, from the environment they inherited.
    assert len(watcher.envs) >= 2, watcher.envs.keys()
    for worker_env in watcher.envs.values():
        assert worker_env.get("WANDB_API_KEY") == marks["wandb"]
        assert marks["secret"] in worker_env.get("PIPELINE_SECRETS", "")
    # ... and used them: the commit reached the bucket.
    uploads = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "checkpoint_upload"]
    assert [e["url"] for e in uploads] == [f"s3://{bucket}/run/step_00000006"]

    # Nowhere written, logged or printed. Ray's own files: a run's own temp dir, seen while it ran,
    # or Ray's default /tmp/ray/session_* (an in-process cluster).
    (kept,) = (run_dir / "logs").glob("ray-session_*")
    session = Path(tempfile.gettempdir()) / "ray" / kept.name.removeprefix("ray-")
    ray_files = _files(tmp_path / "ray-files") + (_files(session) if session.is_dir() else [])
    assert [p for p in ray_files if p.name == "raylet.out"], (watcher.temp_dirs, session)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline and _files(offline[0])
    assert (run_dir / "config.yaml").read_text().count("'***'") == 4
    assert _holding(_files(run_dir) + ray_files, marks) == []
    assert [name for name, value in marks.items() if value in stdout + stderr] == []

    # What could quote one is private to the user.
    for path, mode in (("config.yaml", 0o600), ("events.jsonl", 0o600), ("logs", 0o700), ("wandb", 0o700)):
        assert (run_dir / path).stat().st_mode & 0o777 == mode, path
