"""One URI scheme everywhere: a local path or s3://bucket/prefix.

S3 goes through boto3 with botocore's own retry mode; endpoint and credentials come from the standard AWS environment
and config files (AWS_ENDPOINT_URL points it at MinIO or any S3-compatible store). Ray Train gets a pyarrow S3
filesystem for the same place (`ray_storage`). Nothing here logs credentials: error messages name the bucket, the key
and the endpoint, never a key id or a secret.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from forgetless.errors import ConfigError

# What decides which S3 client to build; a change (a test, a new shell) must give a new client.
_CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_RETRY_MODE",
               "AWS_MAX_ATTEMPTS", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
PREFLIGHT_KEY = ".forgetless-write-check"


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    return bucket, key


def s3_client(max_attempts: int | None = None):
    """A boto3 S3 client. Transient errors are retried by botocore itself (standard mode: exponential backoff with
    jitter; AWS_RETRY_MODE=adaptive adds client-side rate limiting); AWS_MAX_ATTEMPTS overrides the attempts."""
    env = tuple(os.environ.get(k) for k in _CLIENT_ENV)
    return _cached_client(env, max_attempts)


@lru_cache(maxsize=8)
def _cached_client(env: tuple, max_attempts: int | None):
    import boto3  # deferred: boto3/botocore take ~0.3 s to import; only s3:// URIs need them
    from botocore.config import Config  # deferred: as boto3

    attempts = max_attempts or int(os.environ.get("AWS_MAX_ATTEMPTS", "8"))
    return boto3.session.Session().client("s3", config=Config(
        retries={"mode": os.environ.get("AWS_RETRY_MODE", "standard"), "max_attempts": attempts}))


def endpoint_url() -> str | None:
    """The S3 endpoint from the standard variables (None = AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def normalize(uri: str) -> str:
    """Local paths become absolute (Ray needs absolute storage paths); S3 URIs lose a trailing slash."""
    if is_s3(uri):
        return uri.rstrip("/")
    return str(Path(uri).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


# ---------------------------------------------------------------------------------------------------------------------
# S3 errors -> Python's own exceptions with clear messages


def _error_code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_DENIED = {"403", "AccessDenied", "Forbidden", "AllAccessDisabled"}
_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                    "InvalidClientTokenId", "TokenRefreshRequired"}


def _translate(e: Exception, uri: str) -> Exception:
    """A botocore error as FileNotFoundError / PermissionError (both OSError) naming the URI and the fix."""
    from botocore.exceptions import (  # deferred: as boto3
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
    )

    bucket, _ = split_s3(uri)
    where = f" at {endpoint_url()}" if endpoint_url() else ""
    if isinstance(e, NoCredentialsError):
        return PermissionError(f"{uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                               f"AWS_PROFILE, or run where an instance profile / IRSA role provides them")
    if isinstance(e, EndpointConnectionError):
        return ConnectionError(f"{uri}: cannot reach the S3 endpoint{where}; check AWS_ENDPOINT_URL and the network")
    if isinstance(e, ClientError):
        code = _error_code(e)
        if code == "NoSuchBucket":
            return FileNotFoundError(f"{uri}: bucket {bucket!r} does not exist{where}; create it or fix the URI")
        if code in _MISSING:
            return FileNotFoundError(f"{uri}: no such object{where}")
        if code in _BAD_CREDENTIALS:
            return PermissionError(f"{uri}: S3{where} rejected the credentials ({code}); check AWS_ACCESS_KEY_ID / "
                                   f"AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or the AWS profile")
        if code in _DENIED:
            return PermissionError(f"{uri}: access denied{where} ({code}); the credentials from the AWS "
                                   f"environment/config need s3:GetObject, s3:PutObject and s3:ListBucket on "
                                   f"bucket {bucket!r}")
    return e


def _s3_call(uri: str, fn):
    from botocore.exceptions import BotoCoreError, ClientError  # deferred: as boto3

    try:
        return fn()
    except (ClientError, BotoCoreError) as e:
        raise _translate(e, uri) from None


# ---------------------------------------------------------------------------------------------------------------------
# files


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return _s3_call(uri, lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())
    return Path(uri).expanduser().read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        # A PUT is atomic in S3: a reader sees the old object or the whole new one.
        _s3_call(uri, lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def exists(uri: str) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError  # deferred: as boto3

        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if _error_code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise _translate(e, uri) from None
    return Path(uri).exists()


def list_files(uri: str) -> list[str]:
    """Every file under a folder/prefix, as full URIs (sorted)."""
    if is_s3(uri):
        bucket, prefix = split_s3(normalize(uri))
        prefix = prefix + "/" if prefix else ""
        out: list[str] = []

        def collect():
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                # a key ending in "/" is a folder marker (pyarrow's S3 filesystem, which Ray Train uploads
                # checkpoints with, writes one per folder), not a file
                out.extend(f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", []) if not o["Key"].endswith("/"))

        _s3_call(uri, collect)
        return sorted(out)
    root = Path(uri)
    return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def download_dir(uri: str, local_dir: str | os.PathLike) -> Path:
    """Copy a folder (e.g. a Hugging Face model folder) to `local_dir`; a local folder is copied as well."""
    dest = Path(local_dir)
    dest.mkdir(parents=True, exist_ok=True)
    if not is_s3(uri):
        shutil.copytree(uri, dest, dirs_exist_ok=True)
        return dest
    base = normalize(uri)
    files = list_files(base)
    if not files:
        raise FileNotFoundError(f"{uri}: no files under this prefix")
    bucket, _ = split_s3(base)
    for f in files:
        target = dest / f[len(base) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        _, key = split_s3(f)
        _s3_call(f, lambda: s3_client().download_file(bucket, key, str(target)))
    return dest


def upload_dir(local_dir: str | os.PathLike, uri: str) -> None:
    """Copy a local folder to a folder/prefix (exports)."""
    for p in sorted(Path(local_dir).rglob("*")):
        if p.is_file():
            target = join(uri, str(p.relative_to(local_dir)))
            if is_s3(uri):
                bucket, key = split_s3(target)
                _s3_call(target, lambda: s3_client().upload_file(str(p), bucket, key))
            else:
                write_bytes(target, p.read_bytes())


# ---------------------------------------------------------------------------------------------------------------------
# model folders (Hugging Face / timm layout: config.json and weights): a local folder, or an s3:// prefix downloaded
# once per machine. Both the backbones (weights) and the data layer (a text task's tokenizer) read them.


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or os.sep in spec and Path(spec).expanduser().exists()


def check_model_folder(spec: str, prefix: str = "hf:") -> None:
    """Config-time check of `hf:<spec>`: a local folder with config.json, or an s3:// URI (checked when loaded)."""
    if not spec:
        raise ValueError(f"{prefix}: give a model folder, e.g. {prefix}/models/bert-base or {prefix}s3://bucket/bert")
    if spec.startswith("s3://"):
        return
    path = Path(spec).expanduser()
    if not path.exists():
        if not _looks_like_path(spec):
            raise ValueError(
                f"{prefix}{spec}: not a local folder or s3:// URI. forgetless never downloads from the Hugging Face "
                f"hub; download the model once (e.g. `huggingface-cli download {spec} --local-dir DIR`) and give "
                f"{prefix}DIR, or upload DIR to S3 and give {prefix}s3://bucket/prefix"
            )
        raise ValueError(f"{prefix}{spec}: folder does not exist")
    if not path.is_dir() or not (path / "config.json").exists():
        raise ValueError(f"{prefix}{spec}: not a model folder (no config.json inside); give the folder that "
                         f"save_pretrained wrote")


def cache_root() -> Path:
    return Path(os.environ.get("FORGETLESS_CACHE", Path.home() / ".cache" / "forgetless")).expanduser()


def local_folder(spec: str) -> Path:
    """The local folder for `spec`; an s3:// folder is downloaded once per machine into the cache (atomic rename, so
    workers that start together on one node never see half a folder)."""
    if not spec.startswith("s3://"):
        return Path(spec).expanduser().resolve()
    dest = cache_root() / "models" / hashlib.sha256(spec.rstrip("/").encode()).hexdigest()[:16]
    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        download_dir(spec, tmp)
        if not (tmp / "config.json").exists():
            raise ValueError(f"{spec}: not a model folder (no config.json under it)")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "config.json").exists():  # someone else won the race only if the folder is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ---------------------------------------------------------------------------------------------------------------------
# Ray Train and start-up checks


def ray_storage(uri: str) -> dict[str, Any]:
    """`RunConfig` arguments for a storage URI: {storage_path[, storage_filesystem]}.

    With a custom endpoint (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3: MinIO, moto, Ceph ...) Ray gets an explicit pyarrow
    S3 filesystem: recent pyarrow reads AWS_ENDPOINT_URL, but older releases (and AWS_ENDPOINT_URL_S3 in some) do not,
    and a silent fall-back to AWS itself would write checkpoints to the wrong place. Credentials are not put in the
    filesystem object (it is pickled to every worker): each process resolves them from its own AWS environment.
    """
    uri = normalize(uri)
    endpoint = endpoint_url()
    if not is_s3(uri) or not endpoint:
        return {"storage_path": uri}
    import pyarrow.fs as pafs  # deferred: only an s3:// storage with a custom endpoint needs it

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", "8"))
    fs = pafs.S3FileSystem(endpoint_override=endpoint, region=region,
                           retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))
    return {"storage_path": uri[len("s3://"):], "storage_filesystem": fs}


def preflight(uri: str, field: str = "storage") -> None:
    """Fail at start-up, with a clear ConfigError, when the storage cannot be listed and written: a missing bucket,
    wrong credentials, denied access, an unreachable endpoint, or a local folder that cannot be created."""
    uri = normalize(uri)
    if not is_s3(uri):
        existing = Path(uri)
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise ConfigError(f"{field}: cannot create or write {uri} ({existing} is not a writable folder); "
                              f"pick a writable folder or an s3:// URI")
        return
    bucket, prefix = split_s3(uri)
    if not bucket:
        raise ConfigError(f"{field}: {uri!r} names no bucket; use s3://BUCKET/PREFIX")
    probe = join(uri, PREFLIGHT_KEY)
    _, probe_key = split_s3(probe)
    # Few attempts: a wrong endpoint should fail in seconds, not after the full backoff of a training write.
    client = s3_client(max_attempts=2)
    try:
        _s3_call(uri, lambda: client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1))
        _s3_call(uri, lambda: client.put_object(Bucket=bucket, Key=probe_key, Body=b""))
    except OSError as e:
        raise ConfigError(f"{field}: {e}") from None
    try:
        client.delete_object(Bucket=bucket, Key=probe_key)
    except Exception:  # noqa: BLE001 - a policy without s3:DeleteObject leaves an empty marker; harmless
        pass


def check_readable(uri: str, field: str) -> None:
    """ConfigError unless the file at `uri` exists and can be read (checked without downloading it)."""
    try:
        ok = exists(uri)
    except OSError as e:
        raise ConfigError(f"{field}: {e}") from None
    if not ok:
        raise ConfigError(f"{field}: file {uri!r} does not exist")
