"""Config values that reach the sbatch script can neither run commands nor end Slurm's #SBATCH block
(which would silently drop --requeue, --signal and --output): every one is refused (exit 2, naming
its key) or quoted for where it lands. The rendered script is run by bash with stub `srun`, `scontrol`
and `python`, so nothing but a would-be injected `touch MARKER` could happen, and it must not."""

import copy
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config
from pipeline.config import ConfigError
from pipeline.launch import slurm
from tests.helpers import run_cli

SMOKE = "configs/smoke.yaml"
MARKER = "MARKER"  # what an injected command would create: the tests assert it never exists
NASTY = {
    "newline": f"x\ntouch {MARKER}",
    "quotes": "x'y\"z",
    "command substitution": f"$(touch {MARKER})",
    "backticks": f"`touch {MARKER}`",
    "semicolon": f"x; touch {MARKER}",
    "space": "a b",
    "comment": "a #b",
    "placeholder": "{{x}}",
    "template placeholder": "{{setup}}",
    "backslash": "x\\",
}
# keys whose value lands in an #SBATCH line as is: only Slurm's own syntax passes
SLURM_SYNTAX_KEYS = ["slurm.partition", "slurm.account", "slurm.time", "slurm.mem", "slurm.extra_sbatch"]


def sbatch_view(script: str) -> list[str]:
    """The arguments sbatch takes from `script` (its rules, written independently of the pipeline's):
    #SBATCH lines until the first line that is neither blank nor a comment, split like a shell
    splits words (quotes, backslash escapes, '#' comments), without expanding anything."""
    args = []
    for line in script.split("\n"):
        if line.startswith("#SBATCH"):
            lexer = shlex.shlex(line[len("#SBATCH") :], posix=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            args += list(lexer)
        elif line.strip() and not line.lstrip().startswith("#"):
            break
    return args


def stub_tools(tmp_path: Path) -> tuple[Path, Path]:
    """A bin dir with srun/scontrol stubs and a `python` that records its cwd and argv, prints the
    ports exports when asked, and runs nothing; with STUB_SIGNAL_AT=wait-for|train it sends USR1 to
    the batch script there, as Slurm's time limit may (and as the driver, it then waits to be killed).
    scontrol records its calls in scontrol.log. Returns (bin dir, record file)."""
    bin_dir, record = tmp_path / "stubs", tmp_path / "record"
    bin_dir.mkdir(exist_ok=True)
    ports = tmp_path / "ports.sh"
    env = {**slurm.job_ports(7), "RAY_TMP_DIR": str(tmp_path / "raytmp")}
    ports.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    stubs = {
        "python": f'printf "%s\\0" "$PWD" "$@" >>{shlex.quote(str(record))}; printf "\\n" >>{record}\n'
        f"[[ $3 == ports ]] && cat {shlex.quote(str(ports))}\n"
        '[[ $3 == "${STUB_SIGNAL_AT:-}" ]] && kill -USR1 $PPID && [[ $3 == train ]] && { sleep 2 & wait; }\n'
        "exit 0\n",
        "srun": "exit 0\n",
        "scontrol": f'echo "$@" >>{shlex.quote(str(tmp_path / "scontrol.log"))}\n'
        "[[ $1 == show ]] && echo node1\nexit 0\n",
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return bin_dir, record


def run_script(script: str, tmp_path: Path, **env: str) -> list[list[str]]:
    """Run the rendered script with the stubs; the recorded python calls, each [cwd, *argv]."""
    bin_dir, record = stub_tools(tmp_path)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_CPUS_PER_TASK": "2",
        **env,
    }
    done = subprocess.run(
        ["bash", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    calls = record.read_text().split("\0\n") if record.exists() else []
    return [call.split("\0") for call in calls if call]


def tree(tmp_path: Path) -> dict:
    t = config.read_yaml(SMOKE)
    t["run_dir"] = str(tmp_path / "run")
    t["cluster"]["node_ip"] = "127.0.0.2"
    t["slurm"]["python"] = str(tmp_path / "stubs" / "python")
    return t


def set_value(t: dict, key: str, value: str, tmp_path: Path) -> None:
    if key == "run_dir":
        t["run_dir"] = str(tmp_path / f"run {value}")
    elif key == "slurm.python":
        t["slurm"]["python"] = str(tmp_path / f"py {value}" / "python")
    elif key == "slurm.extra_sbatch":
        t["slurm"]["extra_sbatch"] = [f"--comment={value}"]
    else:
        section, _, leaf = key.rpartition(".")
        (t[section] if section else t)[leaf] = value


def render_or_refuse(t: dict, key: str, workdir: Path) -> str | None:
    """The rendered script, or None when the config or render refused the value naming `key`."""
    try:
        cfg = config.from_dict(copy.deepcopy(t))
        return slurm.render(cfg, workdir)
    except ConfigError as e:
        assert f"'{key}'" in str(e), str(e)
        return None


def assert_safe(script: str, cfg_tree: dict, tmp_path: Path, workdir: Path) -> list[list[str]]:
    """sbatch sees every directive whole; bash runs the script without running any injected text."""
    cfg = config.from_dict(copy.deepcopy(cfg_tree))
    snapshot, _, log = slurm.paths(cfg)
    args = sbatch_view(script)
    for directive in ("--requeue", f"--signal=B:USR1@{cfg.slurm.signal_lead_s}", f"--output={log}"):
        assert directive in args, (directive, args)
    assert f"--job-name={cfg.name}" in args
    assert len(args) == sum(line.startswith("#SBATCH") for line in script.splitlines())  # 1 per line
    python = cfg.slurm.python
    Path(python).parent.mkdir(parents=True, exist_ok=True)
    stub_tools(tmp_path)
    if python != str(tmp_path / "stubs" / "python"):
        os.symlink(tmp_path / "stubs" / "python", python)
    workdir.mkdir(parents=True, exist_ok=True)
    calls = run_script(script, tmp_path)
    assert not [p for p in tmp_path.rglob(MARKER)], "an injected command ran"
    (train,) = [c for c in calls if c[1:4] == ["-m", "pipeline", "train"]]
    assert train[0] == str(workdir.resolve()) and train[4] == str(snapshot)
    assert train[5:] == [
        "cluster.address=127.0.0.2:" + slurm.job_ports(7)["RAY_GCS_PORT"],
        "cluster.node_ip=127.0.0.2",
    ]
    return args


@pytest.mark.parametrize("value", NASTY.values(), ids=NASTY.keys())
@pytest.mark.parametrize("key", ["name", *SLURM_SYNTAX_KEYS, "run_dir", "slurm.python"])
def test_a_value_is_refused_naming_its_key_or_reaches_the_job_intact(key, value, tmp_path):
    t = tree(tmp_path)
    set_value(t, key, value, tmp_path)
    script = render_or_refuse(t, key, tmp_path / "work")
    # Slurm reads a backslash in the log path as "no %j patterns": the log would not be found
    if key in SLURM_SYNTAX_KEYS or "\n" in value or (key == "run_dir" and "\\" in value):
        assert script is None, f"{key}={value!r} was not refused"
        return
    if script is None:  # refused, naming the key: safe too, but these should pass quoted
        pytest.fail(f"{key}={value!r} was refused")
    args = assert_safe(script, t, tmp_path, tmp_path / "work")
    if key == "name":
        assert f"--job-name={value}" in args


@pytest.mark.parametrize("value", [v for v in NASTY.values() if "\n" not in v])
def test_the_working_dir_and_the_users_code_dir_are_quoted_for_the_shell(value, tmp_path, monkeypatch):
    workdir = tmp_path / f"work {value}"
    code = tmp_path / f"code {value}"
    code.mkdir()
    module = f"slurmdecode_{abs(hash(value))}"  # a fresh import per case
    (code / f"{module}.py").write_text("def decode(sample):\n    return sample\n")
    monkeypatch.syspath_prepend(str(code))
    t = tree(tmp_path)
    t["data"]["decode"] = f"{module}:decode"
    try:
        script = slurm.render(config.from_dict(copy.deepcopy(t)), workdir)
    finally:
        sys.modules.pop(module, None)
    (line,) = [x for x in script.splitlines() if x.startswith("export PYTHONPATH=")]
    assert_safe(script, t, tmp_path, workdir)
    shown = subprocess.run(
        ["bash", "-c", f'unset PYTHONPATH; {line}; printf %s "$PYTHONPATH"'], capture_output=True, text=True
    )
    assert shown.stdout == str(code)


def test_a_newline_in_a_slurm_value_runs_nothing_and_keeps_every_directive(tmp_path):
    """What the audit found: `x<newline>touch MARKER` as the partition ended the #SBATCH block (no
    --requeue/--signal/--output after it) and ran `touch MARKER` in the job. Refused now, also when
    a config was built without validation (the render's own check)."""
    t = tree(tmp_path)
    t["slurm"]["partition"] = NASTY["newline"]
    script = render_or_refuse(t, "slurm.partition", tmp_path)
    if script is not None:  # what the code before the fix did: show what the job would do
        run_script(script, tmp_path)
        assert not (tmp_path / MARKER).exists(), "the partition's second line ran in the job"
        pytest.fail(f"a newline in slurm.partition was rendered:\n{script[:1500]}")
    valid = config.from_dict(tree(tmp_path))
    for key, field, value in [
        ("slurm.partition", "partition", NASTY["newline"]),
        ("slurm.mem", "mem", "1G\n#SBATCH --no-requeue"),
        ("slurm.extra_sbatch", "extra_sbatch", ["--qos=high\ntouch MARKER"]),
    ]:
        cfg = valid.model_copy(update={"slurm": valid.slurm.model_copy(update={field: value})})
        with pytest.raises(ConfigError, match=f"'{key}'"):
            slurm.render(cfg, tmp_path)
    cfg = valid.model_copy(update={"name": "x\ntouch MARKER"})
    with pytest.raises(ConfigError, match="'name'"):
        slurm.render(cfg, tmp_path)


@pytest.mark.parametrize("during", ["wait-for", "train"])
def test_an_early_time_limit_signal_requeues_the_job_instead_of_ending_it(during, tmp_path):
    """Slurm checks time limits every 30 s and may send the USR1 up to a minute early: while Ray
    starts (before the driver runs), or as the driver starts (before it traps signals). Before the
    fix, bash's default action for USR1 ended the batch script, or the driver died of the forwarded
    SIGTERM: either way the job ended without a requeue, its preemption lost."""
    t = tree(tmp_path)
    script = slurm.render(config.from_dict(t), tmp_path)
    calls = run_script(script, tmp_path, STUB_SIGNAL_AT=during)
    assert "requeue 7" in (tmp_path / "scontrol.log").read_text().splitlines()
    trained = [c for c in calls if c[1:4] == ["-m", "pipeline", "train"]]
    assert len(trained) == (during == "train")  # signalled before it: the driver is never started


@pytest.mark.parametrize(
    "entry",
    [
        "--no-requeue",
        "--signal=USR2@10",
        "--output=/tmp/elsewhere",
        "--req",
        "--sig=B:USR1@1",
        "-q high",
        "--time=5",
    ],
)
def test_extra_sbatch_cannot_take_back_what_preemption_needs(entry, tmp_path):
    """sbatch keeps the last of repeated options and takes abbreviations (--req is --requeue)."""
    t = tree(tmp_path)
    t["slurm"]["extra_sbatch"] = [entry]
    with pytest.raises(ConfigError, match="slurm.extra_sbatch"):
        config.from_dict(t)


def test_legitimate_values_render_as_sbatch_reads_them(tmp_path):
    t = tree(tmp_path)
    t["name"] = 'my "odd" run #1'
    t["slurm"].update(
        partition="gpu,gpu-long",
        account="proj_7.a",
        time="1-12:00:00",
        mem="64G",
        extra_sbatch=["--qos=high", "constraint=a100&ib", "--gres=gpu:a100:2", "--exclusive", "--ntasks=2"],
        setup=["module load cuda/12.4", "echo {{python}} $(true)"],
    )
    script = render_or_refuse(t, "-", tmp_path / "work")
    args = assert_safe(script, t, tmp_path, tmp_path / "work")
    for option in (
        '--job-name=my "odd" run #1',
        "--partition=gpu,gpu-long",
        "--account=proj_7.a",
        "--time=1-12:00:00",
        "--mem=64G",
        "--qos=high",
        "--constraint=a100&ib",
        "--gres=gpu:a100:2",
        "--exclusive",
        "--ntasks=2",
    ):
        assert option in args, option
    assert slurm.sbatch_arguments(script) == args  # the render's own check agrees with this one
    assert "echo {{python}} $(true)" in script  # setup lines are the user's shell, and stay as written


@pytest.mark.parametrize(
    "key, value",
    [("slurm.setup", ["echo a\ntouch MARKER"]), ("slurm.python", "/usr/bin/python\n"), ("name", "a\rb")],
)
def test_control_characters_are_refused_in_shell_lines_too(key, value, tmp_path):
    t = tree(tmp_path)
    section, _, leaf = key.rpartition(".")
    (t[section] if section else t)[leaf] = value
    with pytest.raises(ConfigError, match=f"'{key}'"):
        config.from_dict(t)


@pytest.mark.parametrize(
    "time, lead, ok",
    [
        ("00:02:00", 45, True),
        ("00:02:00", 60, False),
        ("5", 300, False),
        ("UNLIMITED", 300, True),
        ("0", 9, True),
    ],
)
def test_the_signal_lead_must_fit_in_the_time_limit(time, lead, ok, tmp_path):
    """Slurm may send the signal up to a minute early: a lead that leaves no time before it would
    signal (and requeue) every segment before it trained."""
    t = tree(tmp_path)
    t["slurm"].update(time=time, signal_lead_s=lead)
    if ok:
        config.from_dict(t)
    else:
        with pytest.raises(ConfigError, match="slurm.signal_lead_s"):
            config.from_dict(t)


def test_yaml_numbers_for_the_time_limit_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="slurm.time.*00:02:00"):
        config.load(SMOKE, ["slurm.time=1:30:00"])  # YAML reads it as 5400, Slurm would read minutes


@pytest.mark.parametrize("command", [["submit", "slurm"], ["train"]])
def test_the_cli_exits_2_naming_the_key_before_writing_anything(command, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *command,
        SMOKE,
        "data.train=data/digits",
        f"run_dir={run_dir}",
        "slurm.partition=gpu;id",
        "--dry-run",
    ]
    result = run_cli(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error:" in result.stderr and "slurm.partition" in result.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("key, value", [("name", "50%"), ("run_dir", "/tmp/job-%j"), ("name", "my-hetjob")])
def test_log_path_patterns_and_job_splitting_words_are_refused(key, value, tmp_path):
    """Slurm expands '%' patterns in the log path (the default run dir is runs/<name>), so `submit
    --wait` would follow a file that never grows; older sbatch splits a job wherever a line says
    hetjob or packjob."""
    t = tree(tmp_path)
    if key == "name":
        del t["run_dir"]
    t[key] = value
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        slurm.render(config.from_dict(t), tmp_path)
