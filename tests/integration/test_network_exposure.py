"""What a run listens on (issue 16, finding 5): every listening socket of every process a training
run starts (the CLI, its Ray cluster and workers, or its local-launcher ranks) is on loopback, and
the local Ray cluster requires its own token. Sampled from outside while the run trains."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import REPO

SHORT_RUN = [
    "configs/smoke.yaml",
    "model.args.channels=[8,16]",
    "precision=fp32",
    "optim.warmup_steps=2",
    "train.max_steps=40",
    "train.log_every=10",
    "train.eval_every=0",
]


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket
    return (mapped or address).is_loopback


class ProcessTreeSockets:
    """Polls the listening sockets and the environment of a process and all its descendants until
    it ends: {(pid, name, ip, port)} and {pid: (name, environ)}."""

    def __init__(self, root: psutil.Process) -> None:
        self.root = root
        self.listening: set[tuple[int, str, str, int]] = set()
        self.environ: dict[int, tuple[str, dict[str, str]]] = {}
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while self.root.is_running() and self.root.status() != psutil.STATUS_ZOMBIE:
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for proc in tree:
                try:
                    name = proc.name()
                    for conn in proc.net_connections(kind="inet"):
                        if conn.status == psutil.CONN_LISTEN:
                            self.listening.add((proc.pid, name, conn.laddr.ip, conn.laddr.port))
                    if proc.pid not in self.environ:
                        self.environ[proc.pid] = (name, proc.environ())
                except psutil.Error:  # ended between the listing and the look
                    continue
            time.sleep(0.2)

    def exposed(self) -> list[tuple[int, str, str, int]]:
        return sorted(s for s in self.listening if not is_loopback(s[2]))


def train_watched(*args: str, run_dir: Path) -> tuple[subprocess.CompletedProcess, ProcessTreeSockets]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "train", *args, f"run_dir={run_dir}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watcher = ProcessTreeSockets(psutil.Process(proc.pid))
    stdout, stderr = proc.communicate(timeout=540)
    watcher.thread.join(timeout=10)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), watcher


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_the_local_ray_cluster_listens_on_loopback_only_and_requires_its_token(digits_dir, tmp_path):
    done, watcher = train_watched(*SHORT_RUN, f"data.train={digits_dir}", run_dir=tmp_path / "run")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    names = {name for _, name, _, _ in watcher.listening}
    # the sampler saw the cluster: GCS, raylet and the training workers (Ray names them ray::...)
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), names
    assert watcher.exposed() == [], watcher.exposed()

    # token auth on in every Ray process, with a token of this cluster's own that only we can read
    ray_envs = [env for name, env in watcher.environ.values() if name in ("gcs_server", "raylet")]
    assert ray_envs and all(env.get("RAY_AUTH_MODE") == "token" for env in ray_envs)
    token_paths = {env["RAY_AUTH_TOKEN_PATH"] for env in ray_envs}
    assert len(token_paths) == 1
    (token_path,) = token_paths
    assert not Path(token_path).exists()  # removed with the cluster's temp dir at the end
    assert str(Path.home() / ".ray") not in token_path
    # the node IP and the GCS address the cluster's processes use (Ray Train's cleaner reads it)
    assert all(env.get("RAY_ADDRESS", "").startswith("127.0.0.1:") for env in ray_envs)
    print(f"\nlistening sockets seen: {len(watcher.listening)}, all on loopback: {sorted(names)}")


@pytest.mark.dist
@pytest.mark.timeout(600)
def test_the_local_launcher_listens_on_loopback_only(digits_dir, tmp_path, monkeypatch):
    # No GLOO_SOCKET_IFNAME from the test environment: the launcher must choose loopback itself.
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    done, watcher = train_watched(
        *SHORT_RUN, "cluster.launcher=local", f"data.train={digits_dir}", run_dir=tmp_path / "run"
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ranks = {pid for pid, _, _, _ in watcher.listening}
    assert len(ranks) >= 2, watcher.listening  # the store (rank 0) and gloo's pairs in both ranks
    assert watcher.exposed() == [], watcher.exposed()


def test_the_cluster_token_file_is_private(tmp_path):
    from pipeline.launch import ray_local

    path = ray_local._write_token(tmp_path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(path.read_text()) == 64
