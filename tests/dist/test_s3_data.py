"""Shards on a real S3-compatible server (moto's server mode on 127.0.0.1) train exactly like local ones."""

import pytest

from pipeline import config, launch
from pipeline.launch.plan import make_plan
from tests.helpers import read_jsonl

pytestmark = pytest.mark.dist


@pytest.mark.timeout(300)
def test_s3_shards_train_like_local_shards(digits_dir, tmp_path, s3_endpoint):
    import s3fs

    options = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("datasets")
    fs.put(str(digits_dir), "datasets/digits", recursive=True)
    assert fs.exists("datasets/digits/MANIFEST.json") and len(fs.ls("datasets/digits")) == 16

    common = [
        "cluster.launcher=local",
        "model.args.channels=[8,16]",
        "train.max_steps=24",
        "train.log_every=4",
        "precision=fp32",
        "optim.warmup_steps=4",
        "data.ledger=true",
    ]
    runs = {}
    for name, train in (("local", str(digits_dir)), ("s3", "s3://datasets/digits")):
        overrides = [*common, f"data.train={train}", f"run_dir={tmp_path / name}"]
        if name == "s3":
            overrides.append(
                f"data.storage_options={{key: testing, secret: testing, endpoint_url: {s3_endpoint}}}"
            )
        cfg = config.load("configs/smoke.yaml", overrides)
        plan = make_plan(cfg)
        assert plan.spec.train_urls[0].startswith("s3://" if name == "s3" else "/")
        runs[name] = launch.train(plan)

    def curve(name):
        return [
            (m["step"], m["train/loss"])
            for m in read_jsonl(tmp_path / name / "metrics.jsonl")
            if "train/loss" in m
        ]

    assert curve("s3") == curve("local")  # same samples, same order, bit-identical losses (fp32)
    assert runs["s3"]["eval/accuracy"] == runs["local"]["eval/accuracy"]
    for rank in (0, 1):
        local = read_jsonl(tmp_path / "local" / "ledger" / f"rank{rank}.jsonl")
        assert read_jsonl(tmp_path / "s3" / "ledger" / f"rank{rank}.jsonl") == local
        assert len(local) == 24 and all(len(step["keys"]) == 32 for step in local)
