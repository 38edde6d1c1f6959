"""The run's own Ray cluster when no `cluster.address` is given: one node, started with
`ray start --head --block` in a session of its own, listening on loopback only, with a token of its
own, and stopped by the driver. No `import ray` here (that is launch/ray.py's): Ray is a program here.

Why not the cluster `ray.init()` starts inside the driver:
- Process group. ray.init starts GCS, raylet and agents in the driver's process group, so a signal to
  the whole group (`timeout`, Ctrl-C in a shell, `kill -- -PGID`, a supervisor) kills them while the
  driver starts its commit: no checkpoint, no exit 75. Here the group signal reaches the driver
  alone; it commits, then stops the cluster. If the driver dies, the kernel kills the head
  (PR_SET_PDEATHSIG) and Ray's fate sharing and reaper end the rest of its session.
- Loopback. Ray binds GCS, raylet, core workers, agents and metrics to every interface unless the
  node IP is exactly 127.0.0.1, and rewrites 127.0.0.1 to the machine's external address unless
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which only stops other nodes from joining: this cluster has one).
- Fixed ports. The dashboard agent (52365), the autoscaler's and the dashboard's metrics (44217,
  44227) and the Ray client server (10001) default to fixed ports: a second run on the machine
  collided. Each cluster gets free ones, and its own temp dir (sessions, sockets, spilled objects).
- Discovery. Without RAY_ADDRESS, Ray Train's placement-group cleaner finds "the" cluster by looking
  for GCS processes and fails when there are two ("Found multiple active Ray instances"). Every
  process of this cluster gets RAY_ADDRESS.
- Token. Ray's token auth is on, with a token made for this cluster in a 0600 file of a 0700 dir that
  also holds Ray's temp dir (RAY_AUTH_TOKEN_PATH), not the shared ~/.ray/auth_token (written 0644).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets as token_source
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import secrets
from pipeline.launch.plan import TrainingFailed
from pipeline.net import LOOPBACK, free_port, is_loopback, loopback_interface

START_TIMEOUT_S = 120.0  # Ray's own wait for its raylet is 30 s; a loaded machine needs longer in all
STOP_GRACE_S = 3.0
HEAD_LOG = "ray-head.log"


class RayStartFailed(TrainingFailed):
    """The run's local Ray cluster did not start: the machine (load, disk, memory), not the config.
    Exit 1 like any failed run; nothing was trained, re-running the same command is safe."""


@dataclass
class LocalCluster:
    address: str  # GCS host:port
    node_ip: str
    temp_dir: Path
    driver_env: dict[str, str] = field(repr=False)  # what the driver needs before it imports Ray


def node_ip_for(requested: str | None) -> str:
    """The local cluster's node IP: 127.0.0.1 for any loopback request (only there does Ray bind its
    servers to loopback alone), else what was asked for (Ray then binds every interface: the token
    guards them)."""
    return LOOPBACK if requested is None or is_loopback(requested) else requested


def _short_tmp() -> str:
    # Ray puts Unix sockets under the temp dir, and a socket path has at most 107 bytes.
    tmp = tempfile.gettempdir()
    return tmp if len(tmp) <= 40 else "/tmp"


def _write_token(temp_dir: Path) -> Path:
    path = temp_dir / "auth_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, secrets.PRIVATE_FILE)
    with os.fdopen(fd, "w") as f:
        f.write(token_source.token_hex(32))
    return path


def _die_with_parent_hook():
    """A preexec_fn for the head: when the driver dies (SIGKILL, out of memory), the kernel kills
    the head (PR_SET_PDEATHSIG), which takes GCS and raylet with it (Ray's own fate sharing) and its
    reaper the rest: nothing of the run goes on training without it. prctl is looked up here, in
    the parent: between fork and exec the child may only make the call (no loader locks)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    PR_SET_PDEATHSIG = 1

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    return hook


def _head_command(node_ip: str, port: int, num_cpus: int, temp_dir: Path) -> list[str]:
    ray_cli = Path(sys.executable).with_name("ray")
    program = [str(ray_cli)] if ray_cli.is_file() else [sys.executable, "-m", "ray.scripts.scripts"]
    return [
        *program,
        "start",
        "--head",
        "--block",
        f"--node-ip-address={node_ip}",
        f"--port={port}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--dashboard-agent-listen-port={free_port(node_ip)}",
        f"--metrics-export-port={free_port(node_ip)}",
        f"--ray-client-server-port={free_port(node_ip)}",
    ]


def _failure_line(log: Path) -> str:
    """The last error line Ray wrote ("Exception: The current node timed out during startup. ...")."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if "Error" in line.split(":")[0] or line.startswith("Exception")]
    return (errors or lines or [""])[-1][:500]


def _start_failed(reason: str, log: Path) -> RayStartFailed:
    return RayStartFailed(
        f"the run's local Ray cluster did not start: {reason.rstrip('.')}. This is the machine, not "
        "the config: Ray fails to start like this under heavy load (busy CPUs or disk) or with little free "
        "memory, /dev/shm or /tmp; nothing was trained. Re-run the same command when the machine is less "
        f"busy (it resumes from the last checkpoint, if any). Ray's own output: {log}"
    )


def _wait_until_up(head: subprocess.Popen, temp_dir: Path, log: Path, timeout_s: float) -> None:
    # `ray start` writes the cluster's address file once GCS and raylet are up and registered.
    deadline = time.monotonic() + timeout_s
    while not (temp_dir / "ray_current_cluster").is_file():
        code = head.poll()
        if code is not None:
            raise _start_failed(_failure_line(log) or f"`ray start` exited with code {code}", log)
        if time.monotonic() > deadline:
            raise _start_failed(f"not up after {timeout_s:.0f} s", log)
        time.sleep(0.1)


def _stop(head: subprocess.Popen) -> None:
    """The driver is done with the cluster (ray.shutdown): SIGTERM to its whole session (our own
    process group, led by the head), then SIGKILL after STOP_GRACE_S, as `ray stop --force` would.
    Nothing of it is kept but the logs; a graceful stop made GCS and raylet drain for 30 s."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):  # the group outlives its leader: its members
            os.killpg(head.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=wait_s)


def _keep_logs(temp_dir: Path, run_dir: Path) -> bool:
    """Copy the session's log dir (every Ray process's and worker's output, Ray Train's controller
    and worker logs) into RUN_DIR/logs/ray-<session>/: the run keeps what the console no longer
    shows. False when the copy failed (the temp dir is then left where it is)."""
    session = (temp_dir / "session_latest").resolve()
    if not (session / "logs").is_dir():
        return True
    kept = run_dir / "logs" / f"ray-{session.name}"
    try:
        shutil.copytree(session / "logs", kept, dirs_exist_ok=True)
        # Credentials never reach Ray (runtime_env, payload); a traceback quoting one still might.
        for path in [run_dir / "logs" / "ray.log", run_dir / "logs" / HEAD_LOG, *kept.rglob("*")]:
            secrets.scrub_file(path)
    except (OSError, shutil.Error) as e:  # best effort: a run never fails over its logs
        print(f"warning: Ray's logs stay in {session / 'logs'} (not copied: {e})", file=sys.stderr)
        return False
    return True


@contextlib.contextmanager
def local_cluster(
    *, requested_ip: str | None, num_cpus: int, run_dir: Path, timeout_s: float = START_TIMEOUT_S
) -> Iterator[LocalCluster]:
    """Start the run's Ray cluster and stop it on exit (its logs copied into RUN_DIR/logs/).
    Raises RayStartFailed when it does not come up."""
    node_ip = node_ip_for(requested_ip)
    # 0700, ours alone: the token, and Ray's temp dir inside it (Ray makes that one world-writable)
    base = Path(tempfile.mkdtemp(prefix="pipeline-ray-", dir=_short_tmp()))
    temp_dir = base / "r"
    log = run_dir / "logs" / HEAD_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    address = f"{node_ip}:{free_port(node_ip)}"
    shared = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(_write_token(base)),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ADDRESS": address,
    }
    if node_ip == LOOPBACK:
        shared["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep 127.0.0.1 (see the module doc)
        lo = loopback_interface()
        if lo is not None and "GLOO_SOCKET_IFNAME" not in os.environ:
            # gloo otherwise listens on the address the host name resolves to (often the LAN's);
            # the workers get it from the driver's environment (launch/ray.py _worker_env_vars)
            shared["GLOO_SOCKET_IFNAME"] = lo
    head_env = os.environ | shared
    head_env.pop("RAY_AUTH_TOKEN", None)  # it would win over the token file
    head_env["AUTOSCALER_METRIC_PORT"] = str(free_port(node_ip))
    head_env["DASHBOARD_METRIC_PORT"] = str(free_port(node_ip))
    port = int(address.rpartition(":")[2])
    head = None
    keep_temp = False
    try:
        with open(log, "ab") as out:
            head = subprocess.Popen(
                _head_command(node_ip, port, num_cpus, temp_dir),
                env=head_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent_hook(),
            )
        _wait_until_up(head, temp_dir, log, timeout_s)
        yield LocalCluster(address=address, node_ip=node_ip, temp_dir=temp_dir, driver_env=shared)
    finally:
        if head is not None:
            _stop(head)
        keep_temp = not _keep_logs(temp_dir, run_dir)  # the logs (and the token with them) stay
        if not keep_temp:
            shutil.rmtree(base, ignore_errors=True)
