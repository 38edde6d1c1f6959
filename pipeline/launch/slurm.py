"""Ray-on-Slurm: render slurm/ray-on-slurm.sbatch for a run, submit it with sbatch, follow it.

Ports and Ray's temp dir come from SLURM_JOB_ID (`job_ports`), so two jobs sharing a node never
collide (Ray's defaults are fixed ports and /tmp/ray: ray#59551). The batch script reads them with
`python -m pipeline.launch.slurm ports JOB_ID`, so this module is their only source.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import config as config_mod
from pipeline import secrets
from pipeline.config import Config, ConfigError

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "ray-on-slurm.sbatch"

# Ports stay below Linux's ephemeral range (32768-60999), where the kernel picks client ports: a fixed
# port there can be taken by any outgoing connection.
PORT_BASE, PORT_END = 20000, 32768
PORTS_PER_JOB = 64  # 9 fixed ports, 55 for Ray's worker processes
JOB_SLOTS = (PORT_END - PORT_BASE) // PORTS_PER_JOB  # 200: jobs this far apart in id share ports
FIXED_PORTS = (
    "RAY_GCS_PORT",
    "RAY_DASHBOARD_PORT",
    "RAY_CLIENT_PORT",
    "RAY_NODE_MANAGER_PORT",
    "RAY_OBJECT_MANAGER_PORT",
    "RAY_METRICS_PORT",
    "RAY_RUNTIME_ENV_AGENT_PORT",
    "RAY_DASHBOARD_AGENT_GRPC_PORT",
    "RAY_DASHBOARD_AGENT_LISTEN_PORT",
)
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def job_ports(job_id: int) -> dict[str, str]:
    """Ray's ports and temp dir for Slurm job `job_id`: a block of PORTS_PER_JOB ports per job id
    (modulo JOB_SLOTS), so jobs whose ids differ by less than JOB_SLOTS never share one; the temp dir
    (Ray's sockets, logs, session files) is per job id."""
    if job_id < 0:
        raise ValueError(f"a Slurm job id is a positive integer, not {job_id}")
    base = PORT_BASE + (job_id % JOB_SLOTS) * PORTS_PER_JOB
    ports = {name: str(base + i) for i, name in enumerate(FIXED_PORTS)}
    ports["RAY_MIN_WORKER_PORT"] = str(base + len(FIXED_PORTS))
    ports["RAY_MAX_WORKER_PORT"] = str(base + PORTS_PER_JOB - 1)
    # Short: Ray's Unix socket paths under it must stay within 107 bytes.
    ports["RAY_TMP_DIR"] = f"/tmp/ray-job{job_id}"
    return ports


def _cpus_per_task(cfg: Config) -> int:
    if cfg.slurm.cpus_per_task:
        return cfg.slurm.cpus_per_task
    needed = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
    return -(-needed // cfg.slurm.nodes)  # ceil: Ray places the workers on the nodes' CPUs


# sbatch reads directives up to the first line that is neither blank nor a comment; it splits each at
# whitespace outside quotes, takes '...' and "..." as quotes and a backslash as an escape, and ignores
# the rest of a line after an unquoted '#' (_get_argument in Slurm's src/sbatch/opt.c; checked against
# Slurm 22.05). Older versions also split the job wherever a line says "packjob". A newline in a value
# would end the directives there, dropping --requeue and --signal, and run the rest as shell.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PLAIN = re.compile(r"[A-Za-z0-9._,:@%+=/*&|!\[\]()-]+")  # no quoting needed in a directive


def sbatch_quote(value: str) -> str:
    """`value` as one argument of an #SBATCH line (sbatch's quoting, not the shell's)."""
    if _PLAIN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check(key: str, value: str) -> str:
    """`value` if no quoting can break its #SBATCH line; else ConfigError naming `key` (the config's
    validators refuse these earlier: this is the last line of defence)."""
    if _CONTROL.search(value):
        raise ConfigError(
            f"config key '{key}' ({value!r}) holds a newline or another control character: in an "
            "#SBATCH line it would end Slurm's options and run the rest as a shell command"
        )
    if re.search("hetjob|packjob", value, re.IGNORECASE):
        raise ConfigError(f"config key '{key}' ({value!r}): Slurm splits a job at 'hetjob'/'packjob'")
    return value


def _extra(entry: str) -> tuple[str, str | None]:
    match = config_mod.SBATCH_OPTION.fullmatch(entry)
    if not match or config_mod.sbatch_option_owner(match.group(1)):
        raise ConfigError(f"config key 'slurm.extra_sbatch': entry {entry!r} is not an option it may set")
    return match.group(1), match.group(2) and _check("slurm.extra_sbatch", match.group(2))


def _log_path(log_path: Path, key: str) -> str:
    # Slurm expands %-patterns in the path, and a backslash anywhere turns that off (then job-%j.out
    # stays literal): either way `follow` would read the wrong file.
    if re.search(r"[%\\]", str(log_path.parent)):
        raise ConfigError(
            f"config key '{key}': the run dir {log_path.parents[1]} holds '%' or '\\', which Slurm reads "
            "as patterns in its log path; choose a run dir (or name) without them"
        )
    return _check(key, str(log_path))


def sbatch_options(cfg: Config, log_path: Path) -> list[tuple[str, str | None]]:
    """(option, value or None) for each #SBATCH line, every value checked (`_check`)."""
    s = cfg.slurm
    options: list[tuple[str, str | None]] = [
        ("job-name", _check("name", cfg.name)),
        ("nodes", str(s.nodes)),
        ("ntasks-per-node", "1"),
        ("cpus-per-task", str(_cpus_per_task(cfg))),
        ("time", _check("slurm.time", s.time)),
        ("output", _log_path(log_path, "run_dir" if cfg.run_dir else "name")),  # default runs/<name>
        ("open-mode", "append"),  # the requeued segment appends to the same log
        ("requeue", None),
        ("signal", f"B:USR1@{s.signal_lead_s}"),  # B: to the batch shell only, which forwards it
    ]
    if s.partition:
        options.append(("partition", _check("slurm.partition", s.partition)))
    if s.account:
        options.append(("account", _check("slurm.account", s.account)))
    if s.gpus_per_node:
        options.append(("gpus-per-node", str(s.gpus_per_node)))
    if s.mem:
        options.append(("mem", _check("slurm.mem", s.mem)))
    return options + [_extra(entry) for entry in s.extra_sbatch]


def sbatch_lines(cfg: Config, log_path: Path) -> list[str]:
    options = sbatch_options(cfg, log_path)
    lines = [f"#SBATCH --{o}" if v is None else f"#SBATCH --{o}={sbatch_quote(v)}" for o, v in options]
    # each line is exactly its one option to sbatch
    assert sbatch_arguments("\n".join(lines)) == [f"--{o}" if v is None else f"--{o}={v}" for o, v in options]
    return lines


def sbatch_arguments(script: str) -> list[str]:
    """The arguments sbatch reads from the #SBATCH lines of `script`, split the way sbatch splits them."""
    args: list[str] = []
    for line in script.split("\n"):
        if line.startswith("#SBATCH"):
            args += _split_directive(line[len("#SBATCH") :])
        elif line.strip() and not line.lstrip().startswith("#"):
            break  # the first command ends the directives
    return args


def _split_directive(text: str) -> list[str]:
    args, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text) or text[i] == "#":
            return args
        arg, quote, escaped = "", "", False
        while i < len(text) and (quote or not text[i].isspace()):
            c, i = text[i], i + 1
            if escaped or not (c == "\\" or c == quote or (not quote and c in "\"'#")):
                arg, escaped = arg + c, False
            elif c == "\\":
                escaped = True
            elif c == "#":  # an unquoted '#': the rest of the line is a comment
                return [*args, arg] if arg else args
            else:  # an opening or the closing quote
                quote = "" if quote else c
        if quote:
            raise ValueError(f"unmatched {quote} in #SBATCH{text}")
        args.append(arg)


def paths(cfg: Config) -> tuple[Path, Path, Path]:
    """(the config snapshot the job trains from, the batch script, its log with %j for the job id)."""
    slurm_dir = cfg.resolved_run_dir.resolve() / "slurm"
    return slurm_dir / "config.yaml", slurm_dir / "job.sbatch", slurm_dir / "job-%j.out"


def code_roots(cfg: Config) -> list[str]:
    """The directories the users' modules of `cfg` are imported from (plan.user_code_roots). A Slurm
    job imports them from there on every node: they must be on a filesystem all nodes see, at the
    same path (nothing is copied, unlike `pipeline submit ray`)."""
    from pipeline.launch.plan import user_code_roots

    roots = user_code_roots(cfg)
    for root in roots:
        if ":" in root:  # the PYTHONPATH separator
            raise ConfigError(f"your code's directory {root} contains ':', which PYTHONPATH cannot hold")
    return roots


def _pythonpath_lines(roots: list[str]) -> list[str]:
    if not roots:
        return []
    return [
        "# your code (the config's import paths), from the shared filesystem, on every node",
        f"export PYTHONPATH={shlex.quote(':'.join(roots))}${{PYTHONPATH:+:$PYTHONPATH}}",
    ]


def render(cfg: Config, workdir: Path, sweep_file: Path | None = None) -> str:
    """The batch script for `cfg`. It trains from the config snapshot written at submission (paths()),
    so editing the YAML while the job waits or between requeues changes nothing. The users' modules
    the config names are put on PYTHONPATH (`code_roots`) after the `slurm.setup` lines, for the Ray
    nodes (`srun` passes the environment on) and the driver."""
    if cfg.cluster.launcher != "ray":
        raise ConfigError("pipeline submit slurm runs Ray-on-Slurm: set cluster.launcher=ray")
    if not TEMPLATE.is_file():
        raise ConfigError(f"the sbatch template {TEMPLATE} is missing: submit from a checkout of the project")
    snapshot, _, log_path = paths(cfg)
    python = cfg.slurm.python or sys.executable
    values = {
        "sbatch_lines": "\n".join(sbatch_lines(cfg, log_path)),
        "signal_lead_s": str(cfg.slurm.signal_lead_s),
        "workdir": shlex.quote(str(workdir.resolve())),
        "setup": "\n".join([*cfg.slurm.setup, *_pythonpath_lines(code_roots(cfg))]),
        "python": shlex.quote(python),
        "node_ip": shlex.quote(cfg.cluster.node_ip or ""),
        "gpus_per_node": str(cfg.slurm.gpus_per_node),
        # the Ray cluster's token, per job, beside the log: a directory every node sees
        "token_path": shlex.quote(str(snapshot.parent / ".ray-token-")) + '"$SLURM_JOB_ID"',
        # `pipeline sweep SNAPSHOT SWEEP_SNAPSHOT`: the sweep's driver and Tune on the job's Ray cluster,
        # its trials on the same cluster; requeued, it continues from RUN_DIR/sweep.json
        "command_args": f"sweep {shlex.quote(str(snapshot))} {shlex.quote(str(sweep_path(cfg)))}"
        if sweep_file is not None
        else f"train {shlex.quote(str(snapshot))}",
    }
    template = TEMPLATE.read_text()
    unknown = set(re.findall(r"\{\{(\w+)\}\}", template)) - values.keys()
    assert not unknown, f"unfilled placeholders in {TEMPLATE}: {unknown}"
    # One pass over the template: a value that reads like a placeholder ({{setup}}) stays as it is.
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)


def sweep_path(cfg: Config) -> Path:
    """The sweep file's snapshot a sweep job runs (beside the config snapshot)."""
    return paths(cfg)[0].parent / "sweep.yaml"


def submit(cfg: Config, workdir: Path, sweep_file: Path | None = None) -> tuple[int, Path]:
    """Write the config snapshot (and the sweep file's, for a sweep) and the script into RUN_DIR/slurm/,
    sbatch it; (job id, log path)."""
    snapshot, script_path, log_path = paths(cfg)
    script = render(cfg, workdir, sweep_file)
    # 0700/0600: the snapshot has credentials as `***` (the job gets them from the environment sbatch
    # exports), and slurm.setup lines may hold anything
    secrets.private_dir(snapshot.parent)
    secrets.write_private(snapshot, config_mod.dump_yaml(cfg))
    if sweep_file is not None:
        secrets.write_private(sweep_path(cfg), sweep_file.read_text())
    secrets.write_private(script_path, script)
    try:
        out = subprocess.run(
            ["sbatch", "--parsable", str(script_path)], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise ConfigError(
            "sbatch not found: submit from a Slurm login node (or start one: slurm/local-cluster.sh start)"
        ) from None
    if out.returncode != 0:
        raise ConfigError(f"sbatch refused {script_path}: {out.stderr.strip() or out.stdout.strip()}")
    job_id = int(out.stdout.strip().split(";")[0])
    return job_id, Path(str(log_path).replace("%j", str(job_id)))


def job_info(job_id: int) -> dict[str, str] | None:
    """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); None once Slurm forgot it."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        return None
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def follow(job_id: int, log_path: Path, poll_s: float = 2.0, out: Any = None) -> int:
    """Print the job's log as it grows, through requeues, until the job is finished; its exit code."""
    out = out or sys.stdout
    offset, state = 0, None
    while True:
        info = job_info(job_id)
        if log_path.is_file():
            with open(log_path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            out.write(chunk.decode(errors="replace"))
            out.flush()
        if info is None:
            out.write(f"job {job_id}: no longer known to Slurm; its exit code is lost\n")
            return 1
        if info.get("JobState") != state:
            state = info.get("JobState")
            out.write(f"[slurm] job {job_id}: {state} (restarts {info.get('Restarts', '0')})\n")
        if state in FINISHED and offset == (log_path.stat().st_size if log_path.is_file() else 0):
            return int(info.get("ExitCode", "1:0").split(":")[0])
        time.sleep(poll_s)


def _wait_for(host: str, port: int, timeout_s: float = 120.0) -> int:
    """Exit 0 once host:port accepts connections (Ray's GCS is up), 1 after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return 0
        except OSError:
            time.sleep(0.5)
    print(f"pipeline: nothing listens on {host}:{port} after {timeout_s:.0f} s", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    """Helpers for the batch script: `ports JOB_ID` prints shell exports; `wait-for HOST PORT`."""
    if len(argv) == 2 and argv[0] == "ports":
        for key, value in job_ports(int(argv[1])).items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    if len(argv) == 3 and argv[0] == "wait-for":
        return _wait_for(argv[1], int(argv[2]))
    print("usage: python -m pipeline.launch.slurm ports JOB_ID | wait-for HOST PORT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
