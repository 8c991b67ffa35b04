"""One URI scheme everywhere: a local path or s3://bucket/prefix.

S3 goes through boto3 with botocore's own retry mode; endpoint and credentials come from the standard AWS environment
and config files (AWS_ENDPOINT_URL points it at MinIO or any S3-compatible store). Nothing here logs credentials.
"""
from __future__ import annotations

import os
from pathlib import Path


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    return bucket, key


def s3_client():
    import boto3
    from botocore.config import Config

    # Transient errors are retried by botocore itself (standard mode: exponential backoff with jitter).
    return boto3.client("s3", config=Config(retries={"mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                                                     "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "8"))}))


def normalize(uri: str) -> str:
    """Local paths become absolute (Ray needs absolute storage paths); S3 URIs lose a trailing slash."""
    if is_s3(uri):
        return uri.rstrip("/")
    return str(Path(uri).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(uri).expanduser().read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def exists(uri: str) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return Path(uri).exists()


def download_folder(uri: str, dest: str) -> None:
    """Copy every object under `uri` (s3://bucket/prefix or a local folder) into the local folder `dest`."""
    import shutil

    Path(dest).mkdir(parents=True, exist_ok=True)
    if not is_s3(uri):
        shutil.copytree(Path(uri).expanduser(), dest, dirs_exist_ok=True)
        return
    bucket, prefix = split_s3(uri.rstrip("/"))
    prefix = prefix + "/" if prefix else ""
    client = s3_client()
    found = False
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):]
            if not rel or rel.endswith("/"):
                continue
            target = Path(dest, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(target))
            found = True
    if not found:
        raise FileNotFoundError(f"{uri}: no objects under this prefix")
