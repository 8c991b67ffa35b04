"""Ray Jobs: submit `forgetless run|compare|tune` to a Ray cluster through the Jobs API (JobSubmissionClient).

A submission's id is deterministic (config name, command and a hash of the resolved config), so resubmitting the same
config finds its earlier job. The Ray Train run names do not depend on the submission (see runner), so a resubmitted
job resumes from the checkpoints in storage; when the earlier job has ended, the new one gets a suffixed id
(`...-r2`, `-r3`, ...) because Ray never reuses a submission id.

Everything that can fail before the job starts is checked here first (the head answers, the config is valid, the
bucket exists and the credentials work, the MLflow server answers), so a bad submission leaves nothing behind: no job,
no MLflow run, no object in the bucket. Environment values (AWS keys, tokens) are passed to the job but never printed.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from forgetless import console, storage
from forgetless._compat import ray_core
from forgetless.config import ExperimentConfig, load_config, select_strategy
from forgetless.console import say
from forgetless.errors import ConfigError
from forgetless.hashing import short_hash
from forgetless.platform.driver import preflight, ray_cluster
from forgetless.platform.driver import watchdog

# The package folder shipped with a job (`py_modules`): this checkout's forgetless (the package's own folder, named
# `forgetless`: a sub-package shipped as a top-level module would shadow its namesake, e.g. `platform`, in the job).
PACKAGE_DIR = Path(__file__).resolve().parents[2]  # forgetless/platform/driver/jobs.py -> forgetless/

COMMANDS = ("run", "compare", "tune")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Forwarded to the job when set in the submitting shell. AWS_*: endpoint, region, credentials, retry mode;
# MLFLOW_*: the tracking server and its auth. Names only are ever printed.
FORWARD_PREFIXES = ("AWS_", "MLFLOW_")
LOCAL_ONLY_VARS = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                   "AWS_CA_BUNDLE", "AWS_WEB_IDENTITY_TOKEN_FILE")
# What a job's processes are given besides the forwarded variables (a value in the submitting shell wins): Ray Train's
# preemption watcher off, as on the embedded cluster (ray_cluster.PREEMPTION_WATCHER_VARIABLE): an actor per worker
# group, created with max_restarts and killed at the group's end, which Ray's core worker reports as three error lines
# per job; nothing drains nodes here. A cluster on preemptible nodes turns it on with
# `RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=1 forgetless submit ... --env RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`.
# And the job's driver passes its workers' forgetless lines on one by one, also with the Ray seam off
# (ray_core.never_deduplicate).
JOB_DEFAULTS = {ray_cluster.PREEMPTION_WATCHER_VARIABLE: "0", ray_core.DEDUP_ALLOW_VARIABLE: console.LINE_PATTERN}
# Ray's own lines while it packages the working dir and this package for upload (ray_core.upload_loggers), which say
# nothing a user acts on: that .gitignore is honoured (once per package uploaded) and that .venv/.git are left out (a
# new default of Ray's).
UPLOAD_NOISE = ("Ignoring upload to cluster for these files", "is now ignored by default when packaging")
CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN",
                   "MLFLOW_TRACKING_PASSWORD")


# ---------------------------------------------------------------------------------------------------------------------
# the Jobs API client


def resolve_address(address: str | None) -> str:
    addr = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not addr:
        raise ConfigError("--address: give the Ray dashboard address of the head, e.g. --address http://HEAD:8265 "
                          "(or set RAY_ADDRESS)")
    if "://" not in addr:
        addr = "http://" + addr
    return addr.rstrip("/")


def _auth_headers() -> dict[str, str]:
    """Ray's token authentication (on by default for new clusters): the token from RAY_AUTH_TOKEN, the file named by
    RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token when RAY_AUTH_MODE=token -- the same places Ray's own CLI reads."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path and Path(path).exists():
        token = Path(path).read_text().strip()
    if not token and os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        default = Path.home() / ".ray" / "auth_token"
        token = default.read_text().strip() if default.exists() else None
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str | None):
    """A JobSubmissionClient for the head, or a ConfigError saying why the head cannot be used."""
    from ray.job_submission import JobSubmissionClient  # deferred: the Jobs SDK adds ~1 s to every CLI start

    addr = resolve_address(address)
    try:
        return JobSubmissionClient(addr, headers=_auth_headers())
    except Exception as e:  # noqa: BLE001 - ConnectionError, HTTP errors, version mismatches: all end here
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "401" in text or "403" in text or "uthentication" in text:
            raise ConfigError(f"--address: the Ray cluster at {addr} requires a valid token ({text}); set "
                              f"RAY_AUTH_TOKEN (on the head: `ray get-auth-token`)") from None
        raise ConfigError(f"--address: no Ray Jobs API at {addr} ({text}); check that the head is up (`ray status` "
                          f"on it) and that its dashboard port (default 8265) is reachable from here") from None


# ---------------------------------------------------------------------------------------------------------------------
# what is submitted


def submission_base(cfg: ExperimentConfig, command: str, extra_args: list[str]) -> str:
    """Deterministic id: same resolved config + command + extra arguments = same id."""
    digest = short_hash({"config": cfg.model_dump(mode="json"), "command": command, "args": extra_args})
    return f"forgetless-{cfg.name}-{command}-{digest}"


def job_env(forward_credentials: bool = True, extra: Iterable[str] = ()) -> dict[str, str]:
    """The variables passed to the job: AWS_* and MLFLOW_* of this shell (and `extra` names); `forgetless --verbose
    submit` makes the job verbose too (its workers' per-epoch lines in the job's log)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES)}
    env.update({k: os.environ.get(k, v) for k, v in JOB_DEFAULTS.items()})
    if console.verbose():
        env[console.VERBOSE_VARIABLE] = "1"
    for name in extra:
        if name not in os.environ:
            raise ConfigError(f"--env {name}: not set in this shell")
        env[name] = os.environ[name]
    if not forward_credentials:
        env = {k: v for k, v in env.items() if k not in CREDENTIAL_VARS}
    for name in LOCAL_ONLY_VARS:  # name files or profiles of *this* machine; meaningless (or wrong) on the cluster
        env.pop(name, None)
    return env


def _relative_config(config_path: str, working_dir: Path) -> str:
    path = Path(config_path).resolve()
    try:
        return path.relative_to(working_dir).as_posix()
    except ValueError:
        raise ConfigError(f"config: {config_path} is outside the working dir {working_dir} that is uploaded with "
                          f"the job; move it there or pass --working-dir") from None


def _check_submittable(cfg: ExperimentConfig, env: dict[str, str]) -> str:
    """Cluster-only rules: where the results of a job go must outlive the job's temporary working dir."""
    if not storage.is_s3(cfg.storage) and not Path(cfg.storage).is_absolute():
        raise ConfigError(f"storage: {cfg.storage!r} is relative, so it would land in the job's temporary working "
                          f"dir on the cluster; use storage: s3://BUCKET/PREFIX")
    uri = cfg.tracking.tracking_uri or env.get("MLFLOW_TRACKING_URI")
    if not uri or uri.startswith(("sqlite:", "file:", "/", ".")):
        raise ConfigError("tracking.tracking_uri: a submitted job needs an MLflow server (the default SQLite file "
                          "would stay in the job's temporary working dir); set MLFLOW_TRACKING_URI=http://HOST:5000 "
                          "or tracking.tracking_uri")
    return uri


@dataclass
class Submission:
    submission_id: str
    entrypoint: str
    resumes: str | None  # the earlier job of the same config, if any


def choose_submission_id(client, base: str) -> tuple[str, str | None]:
    """The base id if unused; if the earlier job of this config is still running, an error; if it ended, the next
    free suffixed id (same config, so the same Ray Train runs: it resumes from their checkpoints)."""
    family = {j.submission_id: j for j in client.list_jobs()
              if j.submission_id and (j.submission_id == base or j.submission_id.startswith(base + "-r"))}
    if not family:
        return base, None
    running = [i for i, j in family.items() if str(j.status.value if hasattr(j.status, "value") else j.status)
               not in TERMINAL]
    if running:
        raise ConfigError(f"job {running[0]} of this config is still running; follow it with "
                          f"`forgetless jobs logs {running[0]} --follow` or stop it with "
                          f"`forgetless jobs stop {running[0]}` first")
    n = 2
    while f"{base}-r{n}" in family:
        n += 1
    latest = max(family.values(), key=lambda j: j.start_time or 0)
    return f"{base}-r{n}", latest.submission_id


def submit(config_path: str, overrides: list[str], address: str | None, command: str = "compare",
           extra_args: list[str] | None = None, working_dir: str | None = None, ship_code: bool = True,
           forward_credentials: bool = True, extra_env: Iterable[str] = (), local_checks: bool = True) -> tuple[
               Any, Submission]:
    """Validate and check everything, then submit; returns (client, submission)."""
    if command not in COMMANDS:
        raise ConfigError(f"--command: {command!r} is not one of {list(COMMANDS)}")
    extra_args = list(extra_args or [])
    cfg = load_config(config_path, overrides)
    if command == "run":
        strategy = next((extra_args[i + 1] for i, a in enumerate(extra_args[:-1]) if a == "--strategy"), None)
        select_strategy(cfg, strategy)  # the same "pick one" error `forgetless run` would give, but here and now
    wd = Path(working_dir or os.getcwd()).resolve()
    rel = _relative_config(config_path, wd)
    env = job_env(forward_credentials, extra_env)
    tracking_uri = _check_submittable(cfg, env)
    client = connect(address)  # unreachable head: error before anything else is touched
    if local_checks:
        _local_checks(cfg, tracking_uri, env)
    base = submission_base(cfg, command, extra_args)
    sid, previous = choose_submission_id(client, base)
    args = [command, rel, *[a for o in overrides for a in ("--set", o)], *extra_args]
    entrypoint = "python -m forgetless.cli " + " ".join(shlex.quote(a) for a in args)
    runtime_env: dict[str, Any] = {"working_dir": str(wd), "env_vars": env}
    if ship_code:
        # The job runs this checkout's forgetless, whatever version the cluster image has installed.
        runtime_env["py_modules"] = [str(PACKAGE_DIR)]
    say(f"submitting {sid} to {resolve_address(address)}: {entrypoint}")
    say(f"working dir {wd} (without .git, .venv and what .gitignore lists); env passed: "
        f"{', '.join(sorted(env)) or 'none'} (values not shown)")
    if previous:
        say(f"earlier job {previous} of this config has ended; this one resumes from its checkpoints in {cfg.storage}")
    with upload_noise_filtered():
        client.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env,
                          metadata={"forgetless.config": cfg.name, "forgetless.command": command,
                                    "forgetless.submission_base": base,
                                    **({"forgetless.resumes": previous} if previous else {})})
    return client, Submission(sid, entrypoint, previous)


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in UPLOAD_NOISE)


@contextmanager
def upload_noise_filtered():
    """Ray's packaging lines (UPLOAD_NOISE) left out while a job's files are uploaded; `--verbose` keeps them."""
    loggers = [] if console.verbose() else [logging.getLogger(name) for name in ray_core.upload_loggers()]
    drop = _DropLines()
    for lg in loggers:
        lg.addFilter(drop)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)


def _local_checks(cfg: ExperimentConfig, tracking_uri: str, env: dict[str, str]) -> None:
    """The job's own start-up checks, run here before submitting (same code: preflight.preflight), with the environment
    the job will have."""
    with ray_cluster.temporary_environment(env):
        preflight.preflight(cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
            update={"tracking_uri": tracking_uri})}))


# ---------------------------------------------------------------------------------------------------------------------
# following and managing jobs


def status_of(client, submission_id: str) -> str:
    info = _info(client, submission_id)
    return str(info.status.value if hasattr(info.status, "value") else info.status)


def _info(client, submission_id: str):
    try:
        return client.get_job_info(submission_id)
    except RuntimeError as e:
        if "does not exist" in str(e) or "404" in str(e):
            raise ConfigError(f"job {submission_id!r} does not exist on this cluster; see `forgetless jobs list`") \
                from None
        raise


def follow(client, submission_id: str, out=None) -> str:
    """Stream the job's logs until it ends; returns its final status. Ctrl-C stops following, not the job."""
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        say(f"stopped following; the job goes on (`forgetless jobs logs {submission_id} --follow`)")
        return status_of(client, submission_id)
    # the log stream can end a moment before the status turns terminal
    for _ in range(60):
        st = status_of(client, submission_id)
        if st in TERMINAL:
            return st
        time.sleep(1)
    return status_of(client, submission_id)


def describe(client, submission_id: str) -> dict[str, Any]:
    """What `jobs status` shows: no runtime_env (its env_vars hold the forwarded credentials). `stalled`: the driver's
    latest no-progress warning (watchdog) while the job runs and has made no progress since, else None."""
    info = _info(client, submission_id)
    status = str(getattr(info.status, "value", info.status))
    stalled, resizes = None, []
    try:
        log_text = client.get_job_logs(submission_id)
        stalled = None if status in TERMINAL else stall_of(log_text)
        resizes = resizes_of(log_text)
    except RuntimeError as e:  # the logs are a hint; the status itself was read
        stalled = None if status in TERMINAL else f"(its log could not be read: {e})"
    metadata = info.metadata or {}
    resumes = metadata.get("forgetless.resumes")
    if resumes:  # the earlier job of the same config: how it ended is why this one resumes
        try:
            earlier = _info(client, resumes)
            resumes = (f"{resumes} ({str(getattr(earlier.status, 'value', earlier.status))}"
                       + (f": {earlier.message}" if earlier.message else "") + ")")
        except (RuntimeError, ConfigError):
            pass
    return {"submission_id": info.submission_id, "status": status, "stalled": stalled,
            "message": info.message, "resumes": resumes, "resizes": resizes, "entrypoint": info.entrypoint,
            "start_time": info.start_time, "end_time": info.end_time, "metadata": metadata}


def resizes_of(log_text: str) -> list[str]:
    """The resize lines of an elastic run's workers in a job's log (`[forgetless LABEL] resized: 2 -> 1 workers at
    step N: why`), as `LABEL: 2 -> 1 workers at step N: why`."""
    out = []
    for line in log_text.splitlines():
        head, sep, rest = line.partition("] resized: ")
        if sep and "[forgetless " in head:
            out.append(f"{head.rpartition('[forgetless ')[2]}: {rest.partition('; the global batch')[0]}")
    return out


def stall_of(log_text: str) -> str | None:
    """The driver's last no-progress line in a job's log, unless progress was reported after it."""
    stalled = None
    for line in log_text.splitlines():
        text = line.partition("[forgetless] ")[2]
        if text.startswith(watchdog.NO_PROGRESS_PREFIX):
            stalled = text
        elif text.startswith(watchdog.PROGRESS_AGAIN_PREFIX):
            stalled = None
    return stalled


def list_jobs(client, all_jobs: bool = False) -> list[dict[str, Any]]:
    rows = []
    for j in client.list_jobs():
        if not all_jobs and not (j.metadata or {}).get("forgetless.config"):
            continue
        rows.append({"submission_id": j.submission_id, "status": str(getattr(j.status, "value", j.status)),
                     "config": (j.metadata or {}).get("forgetless.config", ""), "start_time": j.start_time})
    return sorted(rows, key=lambda r: r["start_time"] or 0)
