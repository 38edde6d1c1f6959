"""Checkpoints on object storage (a real S3 API: moto's server on 127.0.0.1), 2 processes (local launcher):
every commit is mirrored, a run whose local disk is lost resumes from the bucket, a corrupt remote
commit is skipped with a warning (resume=auto) or refused with exit 2 (resume=that URL)."""

import shutil

import pytest

from pipeline import config, launch
from pipeline.checkpoint import commit
from pipeline.launch.plan import make_plan
from tests.helpers import read_jsonl, run_cli

pytestmark = pytest.mark.faults


@pytest.mark.timeout(400)
def test_checkpoints_mirrored_to_s3_resume_after_losing_the_local_disk(digits_dir, tmp_path, s3_endpoint):
    import s3fs

    options = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}
    s3 = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    s3.mkdir("ckpts")
    url = "s3://ckpts/digits-run"
    run_dir = tmp_path / "run"
    overrides = [
        "cluster.launcher=local",
        "model.args.channels=[8,16]",
        "train.log_every=1",
        "optim.warmup_steps=2",
        "precision=fp32",
        "checkpoint.every=4",
        "checkpoint.keep_last=2",
        f"checkpoint.dir={url}",
        f"checkpoint.storage_options={{key: testing, secret: testing, endpoint_url: {s3_endpoint}}}",
        f"data.train={digits_dir}",
        f"run_dir={run_dir}",
    ]

    def train(steps, *extra):
        return launch.train(
            make_plan(config.load("configs/smoke.yaml", [*overrides, f"train.max_steps={steps}", *extra]))
        )

    train(12)
    s3.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in s3.ls("ckpts/digits-run")) == [
        "step_00000008",
        "step_00000012",
    ]
    for name in ("step_00000008", "step_00000012"):  # what the bucket holds is what was committed
        assert (
            s3.cat_file(f"ckpts/digits-run/{name}/MANIFEST.json")
            == (run_dir / "checkpoints" / name / "MANIFEST.json").read_bytes()
        )
    uploads = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "checkpoint_upload"]
    assert [e["url"] for e in uploads] == [f"{url}/{commit.step_dir_name(s)}" for s in (4, 8, 12)]
    saved = {
        e["step"]: e["weights"]
        for e in read_jsonl(run_dir / "events.jsonl")
        if e["event"] == "checkpoint_commit"
    }

    shutil.rmtree(run_dir / "checkpoints")  # the node's disk is gone; the bucket is not
    final = train(16)
    resume = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "resume"][-1]
    assert resume["from_step"] == 12 and resume["weights"] == saved[12]
    assert final["step"] == 16

    # A flipped byte in the newest remote commit: resume=auto warns and takes the previous one.
    newest = "ckpts/digits-run/step_00000016/trainer_state.json"
    data = bytearray(s3.cat_file(newest))
    data[10] ^= 0xFF
    s3.pipe_file(newest, bytes(data))
    shutil.rmtree(run_dir / "checkpoints")
    args = ["train", "configs/smoke.yaml", *overrides, "train.max_steps=16", "--dry-run"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipping checkpoint s3://ckpts/digits-run/step_00000016" in proc.stderr
    assert "trainer_state.json does not match its xxh3_128" in proc.stderr
    assert "from " + str(run_dir / "checkpoints" / "step_00000012") in proc.stdout

    # Naming that commit explicitly is a usage error that names the file, before anything starts.
    proc = run_cli(*args[:-1], f"resume={url}/step_00000016")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "resume" in proc.stderr and "trainer_state.json" in proc.stderr
    assert commit.committed(run_dir / "checkpoints")[-1].name == "step_00000012"
