"""Issue 16, finding 3: credentials in storage_options are `***` wherever the pipeline writes or prints a
config, reach the processes it starts through their environment only, and what the run writes that could
quote one is private to the user. (The 2-worker Ray run: tests/integration/test_secrets_never_written.py.)"""

import json
import os
import stat
import uuid

import pytest

from pipeline import config, secrets
from pipeline.config import ConfigError
from pipeline.launch import plan as plan_mod
from pipeline.launch import ray as ray_launcher
from pipeline.launch import slurm
from tests.helpers import run_cli

BASE = "configs/smoke.yaml"


@pytest.fixture
def no_recorded(monkeypatch):
    """A process that has read no credentials yet (restored after the test)."""
    monkeypatch.delenv(secrets.ENV, raising=False)


@pytest.fixture
def marks(no_recorded):
    tag = uuid.uuid4().hex[:10]
    return {"key": f"KEY{tag}", "secret": f"SECRET{tag}", "token": f"TOKEN{tag}"}


def _overrides(marks, digits_dir=None, tmp_path=None):
    out = [
        f"data.storage_options={{key: {marks['key']}, "
        f"client_kwargs: {{aws_session_token: {marks['token']}}}}}",
        f"checkpoint.storage_options={{secret: {marks['secret']}, endpoint_url: http://127.0.0.1:9}}",
    ]
    if digits_dir is not None:
        out.append(f"data.train={digits_dir}")
    if tmp_path is not None:
        out.append(f"run_dir={tmp_path / 'run'}")
    return out


def _holds(text: str, marks: dict[str, str]) -> list[str]:
    return [name for name, value in marks.items() if value in text]


def test_secret_names():
    for name in ("key", "secret", "token", "password", "aws_secret_access_key", "account_key", "sas_token"):
        assert secrets.is_secret_name(name), name
    for name in ("endpoint_url", "region_name", "anon", "use_ssl", "client_kwargs"):
        assert not secrets.is_secret_name(name), name


def test_redact_and_restore_round_trip(marks):
    cfg = config.load(BASE, _overrides(marks))
    tree = cfg.to_dict()
    assert tree["data"]["storage_options"] == {"key": "***", "client_kwargs": {"aws_session_token": "***"}}
    assert tree["checkpoint"]["storage_options"] == {"secret": "***", "endpoint_url": "http://127.0.0.1:9"}
    assert _holds(json.dumps(tree) + config.dump_yaml(cfg), marks) == []
    # this process recorded them for the processes it starts; a child rebuilds the real config
    assert set(json.loads(os.environ[secrets.ENV]).values()) == set(marks.values())
    again = config.from_dict(tree)
    assert again.data.storage_options["key"] == marks["key"]
    assert again.data.storage_options["client_kwargs"]["aws_session_token"] == marks["token"]
    assert again.checkpoint.storage_options["secret"] == marks["secret"]
    assert again.digest() == cfg.digest()  # the digest never depends on credentials


def test_a_redacted_config_without_the_credentials_is_an_error_naming_the_key(marks, tmp_path):
    tree = config.load(BASE, _overrides(marks)).to_dict()
    os.environ.pop(secrets.ENV)  # another process, which was not given them
    with pytest.raises(ConfigError, match=r"config key 'data\.storage_options\.key' \(dict\) is '\*\*\*'"):
        config.from_dict(tree)
    written = tmp_path / "config.yaml"
    written.write_text(config.dump_yaml(config.from_dict({**tree, "data": {"train": "x"}, "checkpoint": {}})))
    assert config.load(written).data.train == "x"  # no credentials at all: fine


def test_a_config_built_directly_is_recorded_too(marks):
    cfg = config.Config(data={"train": "x", "storage_options": {"key": marks["key"]}})
    tree = cfg.to_dict()
    assert tree["data"]["storage_options"]["key"] == "***"
    assert config.from_dict(tree).data.storage_options["key"] == marks["key"]


def test_scrub_and_strip(marks, monkeypatch):
    config.load(BASE, _overrides(marks))
    monkeypatch.setenv("WANDB_API_KEY", "wandb-key-123")
    assert secrets.scrub(f"s3fs: InvalidAccessKeyId {marks['key']} / {marks['secret']} wandb-key-123") == (
        "s3fs: InvalidAccessKeyId *** / *** ***"
    )
    tree = {"data": {"storage_options": {"key": "k", "endpoint_url": "u", "client_kwargs": {"token": "t"}}}}
    assert secrets.strip(tree) == ["data.storage_options.key", "data.storage_options.client_kwargs.token"]
    assert tree == {"data": {"storage_options": {"endpoint_url": "u", "client_kwargs": {}}}}


def test_private_files(tmp_path):
    secrets.write_private(tmp_path / "a", "x")
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o600
    (tmp_path / "b").write_text("old")
    (tmp_path / "b").chmod(0o644)
    with secrets.open_private(tmp_path / "b", "a") as f:
        f.write("+new")
    assert (tmp_path / "b").read_text() == "old+new" and stat.S_IMODE(
        (tmp_path / "b").stat().st_mode
    ) == 0o600
    assert stat.S_IMODE(secrets.private_dir(tmp_path / "c" / "d").stat().st_mode) == 0o700


def test_run_dir_config_slurm_files_and_payload_hold_no_credential(marks, digits_dir, tmp_path, monkeypatch):
    plan = plan_mod.make_plan(config.load(BASE, _overrides(marks, digits_dir, tmp_path)))
    run_dir = plan_mod.prepare_run_dir(plan)
    written = (run_dir / "config.yaml").read_text()
    assert written.count("'***'") == 3 and _holds(written, marks) == []
    assert stat.S_IMODE((run_dir / "config.yaml").stat().st_mode) == 0o600
    payload = plan_mod.worker_payload(plan, "abcd1234")  # what Ray Train keeps in its state
    assert _holds(json.dumps(payload), marks) == []

    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))  # the files are written, sbatch is missing
    with pytest.raises(ConfigError, match="sbatch not found"):
        slurm.submit(plan.cfg, tmp_path)
    snapshot, script, _ = slurm.paths(plan.cfg)
    for path in (snapshot, script):
        assert _holds(path.read_text(), marks) == [] and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(snapshot.parent.stat().st_mode) == 0o700


def test_no_credential_in_rays_runtime_env_or_the_job_package(marks, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", marks["token"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = config.load(BASE, _overrides(marks))
    worker_env = ray_launcher._worker_env_vars(cfg)
    job_env = ray_launcher._job_env_vars()
    assert worker_env["WANDB_MODE"] == job_env["WANDB_MODE"] == "offline"
    assert _holds(json.dumps([worker_env, job_env]), marks) == []

    class Out:
        text = ""

        def write(self, s):
            self.text += s

    out = Out()
    job_config = ray_launcher._job_config_text(cfg, out)
    assert _holds(job_config, marks) == [] and "***" not in job_config  # the nodes' own credentials
    assert "endpoint_url: http://127.0.0.1:9" in job_config
    assert "data.storage_options.key, data.storage_options.client_kwargs.aws_session_token" in out.text
    assert "WANDB_API_KEY not sent" in out.text


def test_dry_run_print_config_and_submit_slurm_dry_run_print_no_credential(marks, digits_dir, tmp_path):
    tree = config.read_yaml(BASE)
    tree["data"].update(train=str(digits_dir), storage_options={"key": marks["key"]})
    tree["checkpoint"]["storage_options"] = {"secret": marks["secret"], "token": marks["token"]}
    tree["run_dir"] = str(tmp_path / "run")
    config_file = tmp_path / "secret.yaml"  # in a file: the command line holds none
    config_file.write_text(json.dumps(tree))  # JSON is YAML
    for args in (("train", "--dry-run", "--print-config"), ("submit", "slurm", "--dry-run")):
        proc = run_cli(*args, str(config_file), env={secrets.ENV: ""})
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert _holds(proc.stdout + proc.stderr, marks) == []
        if args[0] == "train":
            assert proc.stdout.count("'***'") == 3
    assert not (tmp_path / "run").exists()  # dry runs write nothing


def test_events_are_scrubbed_and_private(marks, tmp_path):
    from pipeline.tracking import JsonlWriter

    config.load(BASE, _overrides(marks))
    events = JsonlWriter(tmp_path / "events.jsonl", private=True)
    events.write({"event": "checkpoint_upload_failed", "error": f"InvalidAccessKeyId: {marks['key']}"})
    events.close()
    assert json.loads((tmp_path / "events.jsonl").read_text())["error"] == "InvalidAccessKeyId: ***"
    assert stat.S_IMODE((tmp_path / "events.jsonl").stat().st_mode) == 0o600
