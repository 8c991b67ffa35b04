"""MLflow tracking: the parent run per invocation (driver), child runs created by world rank 0 (workers).

Default: a SQLite store `mlflow.db` and an artifact folder `mlruns/` in the working directory. `MLFLOW_TRACKING_URI` or
`tracking.tracking_uri` points it at a server instead. Secrets (AWS keys, tokens) are never logged: params and tags
pass through `redact` first.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from forgetless.console import say
from forgetless.errors import ConfigError
from forgetless import process_lifetime as reaper
# What callers use as tracking.X (`from forgetless.platform.tracking import mlflow_runs as tracking`): the store and
# the metric logging live in their own modules.
from forgetless.platform.tracking.metric_logging import (  # noqa: F401 - re-exported
    TrackingUnavailable, flush_buffered, log_metrics)
from forgetless.platform.tracking.mlflow_store import client, open_store, seed_new_sqlite_store  # noqa: F401

PARENT_TAG = "mlflow.parentRunId"
RUN_KEY_TAG = "forgetless.run_key"
_SECRET_PATTERN = re.compile(r"(secret|token|password|access_key|session_key|credential)", re.I)


@dataclass
class TrackingTarget:
    """What a worker needs to log into the right place (plain data, sent to Ray workers)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_tracking_uri(configured: str | None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            # Relative SQLite paths are relative to each process's cwd; Ray workers run elsewhere.
            uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
        return uri
    return "sqlite:///" + str(Path("mlflow.db").resolve())


def default_artifact_location(uri: str) -> str | None:
    # With the embedded SQLite default, artifacts go to ./mlruns next to the database.
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent.joinpath("mlruns").as_uri()
    return None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (before Ray starts) when a tracking server cannot be reached."""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
        except (urllib.error.URLError, OSError) as e:
            raise ConfigError(
                f"tracking.tracking_uri: MLflow server {uri} is not reachable ({e}); start it or unset "
                f"MLFLOW_TRACKING_URI to use the local SQLite store"
            ) from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///"):]).parent
        if not parent.is_dir():
            raise ConfigError(f"tracking.tracking_uri: folder {parent} for the SQLite store does not exist")


def redact(values: dict[str, Any]) -> dict[str, Any]:
    return {k: ("<redacted>" if _SECRET_PATTERN.search(k) else v) for k, v in values.items()}


def flatten(prefix: str, obj: Any) -> dict[str, Any]:
    """Nested config -> flat MLflow params (`train.lr`, `strategies.0.name`, ...)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
    elif isinstance(obj, list) and obj and isinstance(obj[0], (dict, list)):
        for i, v in enumerate(obj):
            out.update(flatten(f"{prefix}.{i}", v))
    else:
        out[prefix] = obj
    return out


def end_status(error: BaseException) -> str:
    """MLflow's status for a run ended by `error`: KILLED when a user stopped it (Ctrl-C, or SIGTERM from
    `forgetless jobs stop` / `ray job stop`, which init_ray turns into SIGINT: KeyboardInterrupt, or SystemExit from
    Ray Train's graceful abort during a fit; forgetless itself never calls sys.exit), FAILED otherwise."""
    return "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"


def run_exists(uri: str, run_id: str | None) -> bool:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        client(uri).get_run(run_id)
        return True
    except MlflowException:
        return False


def ensure_experiment(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=default_artifact_location(uri))


def start_parent_run(target_uri: str, experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
    """The parent run of this invocation. `tags` identify the command (IDENTITY_TAGS); a RUNNING parent run of the
    same command whose driver is gone (killed: it could not end its run) is closed as KILLED first."""
    close_stale_parent_runs(target_uri, experiment_id, tags)
    c = client(target_uri)
    run = c.create_run(experiment_id, run_name=run_name, tags=redact({**tags, DRIVER_TAG: driver_identity()}))
    return run.info.run_id


DRIVER_TAG = "forgetless.driver"  # host:pid:process start time of the invocation's driver
IDENTITY_TAGS = ("forgetless.command", "forgetless.name", "forgetless.config_hash")


def driver_identity(pid: int | None = None) -> str:
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{reaper.started_token(pid)}"


def driver_alive(identity: str) -> bool | None:
    """Whether the driver named by a DRIVER_TAG value still runs: None when it ran on another host (unknowable)."""
    host, _, rest = identity.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname():
        return None
    try:
        return reaper.alive(int(pid), started)
    except ValueError:
        return False


def close_stale_parent_runs(uri: str, experiment_id: str, tags: dict[str, str]) -> list[str]:
    """Close as KILLED the RUNNING parent runs (and their RUNNING child runs) of the same command and config whose
    driver no longer runs; returns their ids. A driver on another host cannot be checked: its run is left alone."""
    c = client(uri)
    match = " and ".join(f"tags.`{k}` = '{tags[k]}'" for k in IDENTITY_TAGS if k in tags)
    if not match:
        return []
    closed = []
    for run in c.search_runs([experiment_id], filter_string=f"{match} and attributes.status = 'RUNNING'",
                             max_results=50):
        alive = driver_alive(run.data.tags.get(DRIVER_TAG, ""))
        if alive is False:
            children = c.search_runs([experiment_id], max_results=1000, filter_string=(
                f"tags.`{PARENT_TAG}` = '{run.info.run_id}' and attributes.status = 'RUNNING'"))
            # MLflow's "View run ... at" lines for runs being closed would read as links to the current ones
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
            for r in [*children, run]:
                c.set_terminated(r.info.run_id, "KILLED")
            closed.append(run.info.run_id)
            say(f"MLflow: an earlier run of the same command ({run.info.run_id}) was still marked as running, but the "
                f"process that ran it has ended; it is now marked KILLED (what it logged stays)")
        elif alive is None:
            say(f"MLflow: run {run.info.run_id} of the same command is RUNNING, started by a driver on another host "
                f"({run.data.tags.get(DRIVER_TAG)}); left as it is")
    return closed


def find_unfinished_run(uri: str, experiment_id: str, run_key: str) -> str | None:
    """An unfinished child run with this key (a killed invocation) is resumed rather than duplicated."""
    runs = client(uri).search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=5,
        order_by=["attributes.start_time DESC"],
    )
    for r in runs:
        if r.info.status != "FINISHED":
            return r.info.run_id
    return None


def open_child_run(target: TrackingTarget, run_key: str, display_name: str, tags: dict[str, str],
                   params: dict[str, Any], known_run_id: str | None = None) -> str:
    """The child run of one Ray Train run: created under the invocation's parent, or, on resume, the same run again
    (`known_run_id` from the checkpoint, or an unfinished run with this key left by a killed invocation)."""
    uri = target.tracking_uri
    run_id = known_run_id or find_unfinished_run(uri, target.experiment_id, run_key)
    if target.parent_run_id:
        tags = {**tags, PARENT_TAG: target.parent_run_id}
    c = client(uri)
    if run_id is None:
        run_id = c.create_run(target.experiment_id, run_name=display_name, tags=redact(tags)).info.run_id
    else:
        for k, v in tags.items():
            c.set_tag(run_id, k, v)
        c.update_run(run_id, status="RUNNING")
    log_params(uri, run_id, params)
    return run_id


def new_params(params: dict[str, Any], existing: dict[str, str]) -> list:
    """`params` as MLflow Params (redacted, values cut to MLflow's 6000 characters), less those the run has already:
    a resumed run keeps its params (they cannot change)."""
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in redact(params).items() if k not in existing]


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    c = client(uri)
    items = new_params(params, c.get_run(run_id).data.params)
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])
