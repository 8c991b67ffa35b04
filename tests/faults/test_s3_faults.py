"""S3 that misbehaves: a fault-injecting proxy in front of a real S3-compatible server (moto in server mode) answers
bursts of 503s, drops connections and answers slowly. botocore's retries (standard mode, AWS_MAX_ATTEMPTS, read by
forgetless.storage) absorb every fault, and every checkpoint written through it verifies against its manifest."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import boto3
import pytest
import torch

from forgetless import storage
from forgetless.platform.worker import checkpoints

from conftest import point_aws_env_at

from .fault_proxy import FaultProxy, FaultSchedule


@pytest.fixture
def faulty_s3(s3server, monkeypatch):
    """The standard AWS variables pointing at the proxy; botocore's standard retry mode with 8 attempts."""
    proxy = FaultProxy(s3server.s3_endpoint, FaultSchedule())
    point_aws_env_at(s3server, monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "8")
    yield proxy
    proxy.stop()


def _checkpoint(folder: Path, seed: int) -> Path:
    """A checkpoint-shaped folder: a model, a state, a DeepSpeed shard, and the manifest written last."""
    (folder / "ds" / "ds").mkdir(parents=True)
    torch.save({"w": torch.randn(50_000 + seed)}, folder / "model.pt")
    (folder / "state.json").write_text(f'{{"epoch": {seed}}}')
    (folder / "ds" / "ds" / "mp_rank_00_model_states.bin").write_bytes(os.urandom(50_000 + seed))
    (folder / checkpoints.MANIFEST_FILE).write_bytes(checkpoints.manifest_bytes(checkpoints.describe_files(folder)))
    return folder


def test_faults_are_absorbed_and_every_checkpoint_verifies(faulty_s3, s3server, tmp_path):
    run = f"s3://{s3server.bucket}/faults/run"
    names = [f"checkpoint_s1_p0_e{e:04d}" for e in range(1, 5)]
    for e, name in enumerate(names, start=1):
        storage.upload_dir(_checkpoint(tmp_path / name, e), storage.join(run, name))
    storage.write_bytes(storage.join(run, "driver_wall.json"), b'{"wall_seconds": 1.0}')

    # every checkpoint in the bucket, read back through the same faulty endpoint, verifies against its manifest
    in_bucket = sorted({f[len(run) + 1:].split("/")[0] for f in storage.list_files(run)} - {"driver_wall.json"})
    assert in_bucket == names
    for name in in_bucket:
        with tempfile.TemporaryDirectory() as d:
            assert checkpoints.fetch_verified(storage.join(run, name), d) is None, name

    # and the objects themselves, read from the server directly (no proxy): the sizes the manifests name
    direct = boto3.client("s3", endpoint_url=s3server.s3_endpoint, region_name=s3server.region,
                          aws_access_key_id=s3server.access_key_id,
                          aws_secret_access_key=s3server.secret_access_key)
    for name in names:
        for rel, expected in checkpoints.describe_files(tmp_path / name).items():
            head = direct.head_object(Bucket=s3server.bucket, Key=f"faults/run/{name}/{rel}")
            assert head["ContentLength"] == expected["size"], (name, rel)

    injected = faulty_s3.schedule.injected
    print(f"requests {faulty_s3.schedule.n}, injected {dict(injected)}")  # the numbers in docs/reliability.md
    assert injected["503"] >= 4 and injected["drop"] >= 2 and injected["slow"] >= 2, injected
