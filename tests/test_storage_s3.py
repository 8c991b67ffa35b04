"""Storage through S3, against a real S3-compatible server (moto in server mode on 127.0.0.1, with signature checks
on, so wrong credentials are rejected like on AWS). No Ray here: these are the storage, data and weights paths that
the Ray workers and the driver share."""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from forgetless import storage
from forgetless.backbones import build_backbone
from forgetless.config import ConfigError, TaskConfig, load_config
from forgetless.data.tasks import build_task
from forgetless.platform.worker.model_io import load_torch_file
from forgetless.platform.driver.preflight import preflight

from conftest import point_aws_env_at


@pytest.fixture
def s3env(s3server, monkeypatch):
    """The standard AWS variables pointing at the test server (what a user sets for MinIO)."""
    point_aws_env_at(s3server, monkeypatch)
    return s3server


def _boto(stack):
    return boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name=stack.region,
                        aws_access_key_id=stack.access_key_id, aws_secret_access_key=stack.secret_access_key)


def test_read_write_exists_list(s3env):
    base = f"s3://{s3env.bucket}/unit/rw"
    uri = storage.join(base, "a", "b.json")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b'{"x": 1}')
    assert storage.exists(uri)
    assert json.loads(storage.read_bytes(uri)) == {"x": 1}
    # really in the bucket, under the key the URI names
    body = _boto(s3env).get_object(Bucket=s3env.bucket, Key="unit/rw/a/b.json")["Body"].read()
    assert body == b'{"x": 1}'
    storage.write_bytes(storage.join(base, "c.txt"), b"c")
    assert storage.list_files(base) == [f"{base}/a/b.json", f"{base}/c.txt"]
    with pytest.raises(FileNotFoundError, match="no such object"):
        storage.read_bytes(storage.join(base, "missing.bin"))


def test_folder_round_trip(s3env, tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    storage.upload_dir(src, f"s3://{s3env.bucket}/unit/hf-model")
    out = storage.download_dir(f"s3://{s3env.bucket}/unit/hf-model", tmp_path / "copy")
    assert (out / "config.json").read_text() == "{}"
    assert (out / "sub" / "weights.bin").read_bytes() == b"\x00\x01"


def test_folders_written_by_pyarrow_download_without_their_markers(s3env, tmp_path):
    """Ray Train uploads checkpoints with pyarrow's S3 filesystem, which writes a marker object ("<folder>/") for each
    folder it creates; a checkpoint read back must come out as its files only (a marker once became a local path
    that was a folder, and every S3 checkpoint failed its verification)."""
    kw = storage.ray_storage(f"s3://{s3env.bucket}/unit/pyarrow-ckpt/")
    fs, root = kw["storage_filesystem"], kw["storage_path"]
    fs.create_dir(f"{root}/ds")
    with fs.open_output_stream(f"{root}/ds/shard.pt") as f:
        f.write(b"shard")
    keys = [o["Key"] for o in storage.s3_client().list_objects_v2(Bucket=s3env.bucket,
                                                                    Prefix="unit/pyarrow-ckpt/")["Contents"]]
    assert any(k.endswith("/") for k in keys), keys  # the marker is there, as Ray Train leaves it
    base = f"s3://{s3env.bucket}/unit/pyarrow-ckpt"
    assert storage.list_files(base) == [f"{base}/ds/shard.pt"]
    out = storage.download_dir(base, tmp_path / "copy")
    assert (out / "ds" / "shard.pt").read_bytes() == b"shard"


def test_dataset_npz_and_parquet_from_s3(s3env):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    y = np.repeat(np.arange(3), 40)
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    s3 = _boto(s3env)
    s3.put_object(Bucket=s3env.bucket, Key="unit/data/toy.npz", Body=buf.getvalue())
    table = pa.table({**{f"f{i}": x[:, i] for i in range(6)}, "label": y})
    pbuf = io.BytesIO()
    pq.write_table(table, pbuf)
    s3.put_object(Bucket=s3env.bucket, Key="unit/data/toy.parquet", Body=pbuf.getvalue())

    for ext in ("npz", "parquet"):
        task = build_task(TaskConfig(dataset=f"s3://{s3env.bucket}/unit/data/toy.{ext}", classes=[0, 2]))
        n = len(task.x_train) + len(task.x_val) + len(task.x_test)
        assert n == 80 and task.num_classes == 2
        # the values are the uploaded ones (classes 0 and 2, in order, as a 1-channel sequence)
        all_x = np.concatenate([task.x_train.numpy(), task.x_val.numpy(), task.x_test.numpy()])[:, 0, :]
        assert np.allclose(np.sort(all_x.sum(1)), np.sort(x[np.isin(y, [0, 2])].sum(1)), atol=1e-5)


def test_backbone_weights_from_s3(s3env):
    net = build_backbone("mlp", (1, 64), {"hidden": [16]})
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    uri = f"s3://{s3env.bucket}/unit/weights/mlp.pt"
    storage.write_bytes(uri, buf.getvalue())
    storage.check_readable(uri, "backbone.weights")
    state = load_torch_file(uri)
    fresh = build_backbone("mlp", (1, 64), {"hidden": [16]})
    fresh.load_state_dict(state)
    for a, b in zip(net.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_preflight_ok_leaves_nothing(s3env):
    storage.preflight(f"s3://{s3env.bucket}/unit/preflight")
    keys = [o["Key"] for o in _boto(s3env).list_objects_v2(Bucket=s3env.bucket,
                                                            Prefix="unit/preflight").get("Contents", [])]
    assert keys == []  # the write probe is removed again


def test_missing_bucket_is_a_config_error(s3env):
    with pytest.raises(ConfigError, match="storage: .*bucket 'no-such-bucket' does not exist"):
        storage.preflight("s3://no-such-bucket/runs")


def test_wrong_credentials_are_a_config_error_without_the_key(s3env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-123")
    with pytest.raises(ConfigError, match="rejected the credentials") as e:
        storage.preflight(f"s3://{s3env.bucket}/runs")
    assert "wrong-secret-value-123" not in str(e.value) and s3env.access_key_id not in str(e.value)


def test_denied_access_is_a_config_error(s3env, monkeypatch):
    iam = boto3.client("iam", endpoint_url=s3env.s3_endpoint, region_name=s3env.region,
                       aws_access_key_id=s3env.access_key_id, aws_secret_access_key=s3env.secret_access_key)
    iam.create_user(UserName="reader-none")
    key = iam.create_access_key(UserName="reader-none")["AccessKey"]  # no policy: every S3 call is denied
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    with pytest.raises(ConfigError, match="storage: .*access denied"):
        storage.preflight(f"s3://{s3env.bucket}/runs")


def test_ray_gets_an_s3_filesystem_for_the_custom_endpoint(s3env):
    """With AWS_ENDPOINT_URL set, Ray Train receives an explicit pyarrow S3 filesystem for that endpoint (and no
    credentials inside it: it is pickled to every worker)."""
    kw = storage.ray_storage(f"s3://{s3env.bucket}/unit/ray/")
    assert kw["storage_path"] == f"{s3env.bucket}/unit/ray"
    fs = kw["storage_filesystem"]
    assert isinstance(fs, pafs.S3FileSystem)
    assert s3env.secret_access_key.encode() not in pickle.dumps(fs)
    with fs.open_output_stream(f"{kw['storage_path']}/probe.txt") as f:
        f.write(b"via pyarrow")
    assert storage.read_bytes(f"s3://{s3env.bucket}/unit/ray/probe.txt") == b"via pyarrow"
    assert storage.ray_storage("relative/dir") == {"storage_path": str(Path("relative/dir").resolve())}


def test_runner_preflight_checks_storage_and_weights(s3env, workdir, tiny_config):
    """The driver's start-up checks (before Ray starts): a missing bucket and a missing weights file are errors that
    name the field; a good S3 config passes."""
    good = load_config(tiny_config(storage=f"s3://{s3env.bucket}/unit/runs"))
    assert preflight(good).startswith("sqlite:///")
    with pytest.raises(ConfigError, match="^storage: "):
        preflight(load_config(tiny_config(storage="s3://no-such-bucket/x")))
    with pytest.raises(ConfigError, match="^backbone.weights: file .* does not exist"):
        preflight(load_config(tiny_config(storage=f"s3://{s3env.bucket}/unit/runs",
                                          backbone={"name": "mlp", "params": {"hidden": [32]},
                                                    "weights": f"s3://{s3env.bucket}/unit/none.pt"})))
