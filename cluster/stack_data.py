"""The local stack's state is whole or absent: MLflow's store (a SQLite file in the stack's folder) and the S3 data it
points at (moto keeps objects in memory only) are kept together or dropped together.

`down` copies every object of the bucket into `<dir>/s3-data/` (objects plus a manifest, written last: a snapshot
without its manifest is incomplete) before it stops the S3 server; `up` puts them back into the new server's bucket and
removes the snapshot (the data lives in the server again). If the S3 server is gone before `down` could copy it (it
crashed, the machine rebooted), or `up` finds an MLflow store without a complete snapshot, the MLflow store no longer
matches any S3 data: it is moved aside (`mlflow.db.orphaned-<time>`), said in one line, and the stack starts empty.
`down --drop-data` drops both on purpose.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

SNAPSHOT = "s3-data"
MANIFEST = "manifest.json"
MLFLOW_DB = "mlflow.db"


def snapshot_dir(stack_dir: str) -> Path:
    return Path(stack_dir, SNAPSHOT)


def create_user(endpoint: str, region: str) -> tuple[str, str]:
    """moto's IAM bootstrap (its first requests are not checked): a user with S3 rights and its key, which every later
    request must be signed with, as on AWS."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name=region, aws_access_key_id="bootstrap",
                       aws_secret_access_key="bootstrap")
    iam.create_user(UserName="forgetless")
    key = iam.create_access_key(UserName="forgetless")["AccessKey"]
    iam.put_user_policy(UserName="forgetless", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:*", "iam:*"], "Resource": "*"}]}))
    return key["AccessKeyId"], key["SecretAccessKey"]


def save_or_orphan(s3_client, bucket: str, stack_dir: str) -> None:
    """At `down`: the bucket into the stack's folder, next to the MLflow store; if the S3 server is gone, the store
    that points at its lost data is moved aside (a snapshot never restored is still whole: it stays)."""
    try:
        n = save_bucket(s3_client(), bucket, stack_dir)
        print(f"S3: {n} objects of s3://{bucket} saved in {snapshot_dir(stack_dir)} (back with the next `up`)",
              file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - server gone, or never started
        if not snapshot_dir(stack_dir).joinpath(MANIFEST).exists():
            orphan_mlflow_store(stack_dir, f"the S3 server's data could not be saved ({str(e).splitlines()[0][:120]})")


def save_bucket(s3, bucket: str, stack_dir: str) -> int:
    """Copy every object of `bucket` into the stack's snapshot folder; returns how many. The manifest goes last."""
    folder = snapshot_dir(stack_dir)
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "objects").mkdir(parents=True)
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            s3.download_file(bucket, obj["Key"], str(folder / "objects" / str(len(keys))))
            keys.append(obj["Key"])
    (folder / MANIFEST).write_text(json.dumps({"bucket": bucket, "keys": keys, "saved_at": time.time()}))
    return len(keys)


def restore_bucket(s3, bucket: str, stack_dir: str) -> int | None:
    """Put a complete snapshot back into `bucket` and remove it; returns how many objects (None: no snapshot)."""
    folder = snapshot_dir(stack_dir)
    manifest = folder / MANIFEST
    if not manifest.exists():
        return None
    keys = json.loads(manifest.read_text())["keys"]
    for i, key in enumerate(keys):
        s3.upload_file(str(folder / "objects" / str(i)), bucket, key)
    shutil.rmtree(folder)
    return len(keys)


def orphan_mlflow_store(stack_dir: str, why: str) -> Path | None:
    """Move an MLflow store whose S3 data is gone out of the way (kept, for a look), saying why."""
    db = Path(stack_dir, MLFLOW_DB)
    if not db.exists():
        return None
    aside = db.with_name(f"{MLFLOW_DB}.orphaned-{time.strftime('%Y%m%d-%H%M%S')}")
    db.rename(aside)
    print(f"{why}: the MLflow store that pointed at it is moved to {aside}; the stack starts with an empty store and "
          f"an empty bucket (whole or absent, never runs without their artifacts)")
    return aside


def drop(stack_dir: str) -> None:
    """`down --drop-data`: the MLflow store and the saved S3 data, both."""
    Path(stack_dir, MLFLOW_DB).unlink(missing_ok=True)
    shutil.rmtree(snapshot_dir(stack_dir), ignore_errors=True)
