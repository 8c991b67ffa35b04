"""MLflow tracking: the parent run per invocation (driver), child runs created by world rank 0 (workers).

Default: a SQLite store `mlflow.db` and an artifact folder `mlruns/` in the working directory. `MLFLOW_TRACKING_URI` or
`tracking.tracking_uri` points it at a server instead. Secrets (AWS keys, tokens) are never logged: params and tags
pass through `redact` first.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from forgetless import console
from forgetless.console import say
from forgetless.errors import ConfigError
from forgetless.platform.tracking import metric_buffer
from forgetless import process_lifetime as reaper

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


def seed_new_sqlite_store(uri: str) -> None:
    """A new SQLite store starts as a copy of an empty store already at MLflow's current schema.

    MLflow creates a SQLite store by running every one of its schema migrations (alembic, ~200 scripts): about 2 s on
    a 2-core machine, at the first run in every folder (the demo) and in every test that tracks into a fresh folder.
    The migrated empty store is made once per MLflow version (in the temp folder, written atomically: any process may
    make it or use it) and copied; MLflow then finds its tables and schema version in place and only adds its default
    experiment, with this store's own artifact location. Any problem falls back to MLflow's own creation."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///"):])
    if db.exists() or not db.parent.is_dir():
        return
    try:
        template = _empty_store_template()
        _put_in_place(db, lambda tmp: shutil.copyfile(template, tmp))
    except Exception:  # noqa: BLE001 - an optimisation only: MLflow creates the store itself
        return


def _put_in_place(final: Path, write) -> None:
    """`write(tmp)` a file next to `final`, then link it in as `final` unless another process did first (a link never
    replaces a file; a reader never sees a half-written one)."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{time.monotonic_ns()}")
    try:
        write(tmp)
        os.link(tmp, final)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def _empty_store_template() -> Path:
    import mlflow
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables  # MLflow's own creation of a store's schema

    template = Path(tempfile.gettempdir()) / f"forgetless-mlflow-{mlflow.__version__}-empty-store.db"
    if template.exists():
        return template

    def migrate(tmp: Path) -> None:
        engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()

    _put_in_place(template, migrate)
    return template


def client(uri: str):
    from mlflow.tracking import MlflowClient

    if not console.verbose():
        # its two INFO lines on a new sqlite store ("Creating initial MLflow database tables...") ask nothing of a
        # user
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    seed_new_sqlite_store(uri)
    return MlflowClient(tracking_uri=uri)


def open_store(uri: str) -> None:
    """Import MLflow and open the tracking store (a new SQLite store is created): ~2-3 s on 2 cores that need nothing
    of Ray, so the driver does it while its embedded Ray cluster starts (runner._start_ray)."""
    client(uri).search_experiments(max_results=1)


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
            for r in [*children, run]:
                c.set_terminated(r.info.run_id, "KILLED")
            closed.append(run.info.run_id)
            say(f"MLflow: run {run.info.run_id} of the same command was left RUNNING by a driver that no longer runs "
                f"({run.data.tags.get(DRIVER_TAG)}); closed as KILLED")
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


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    c = client(uri)
    items = [Param(k, str(v)[:6000]) for k, v in redact(params).items()]
    existing = c.get_run(run_id).data.params
    items = [p for p in items if p.key not in existing]  # a resumed run keeps its params (they cannot change)
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log one point per metric at `step`. A point already in the run's history (same key and step: a re-trained
    epoch of a resumed run, a re-logged summary) is skipped. When the server does not answer within
    FORGETLESS_TRACKING_RETRIES retries, the points go to the on-disk buffer (metric_buffer) and are sent later:
    tracking never stops training, and nothing is lost."""
    ts = int(time.time() * 1000)
    points = [metric_buffer.MetricPoint(k, float(v), ts, int(step)) for k, v in metrics.items()
              if v is not None and not math.isnan(float(v))]
    if not points:
        return
    if time.monotonic() < _retry_after.get(uri, 0.0):  # the server failed moments ago: do not wait on it again yet
        metric_buffer.append(uri, run_id, points)
        return
    try:
        _flush_run(uri, run_id)  # what was buffered is older: it goes first
        _send_new(uri, run_id, points)
    except TrackingUnavailable as e:
        _buffer_after_failure(uri, run_id, points, e)


class TrackingUnavailable(Exception):
    """The tracking server did not answer (down, restarting, 5xx, timeouts) within the retry budget."""


# Per process: the (key, step) points each run already has on the server, loaded once per run.
_logged: dict[tuple[str, str], set[tuple[str, int]]] = {}
# Per tracking URI: until when (time.monotonic) metric logging goes straight to the buffer after a failure.
_retry_after: dict[str, float] = {}


def _env_number(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def _buffer_after_failure(uri: str, run_id: str, points: list, error: Exception) -> None:
    path = metric_buffer.append(uri, run_id, points)
    cool_off = _env_number("FORGETLESS_TRACKING_RETRY_AFTER_S", 30)
    first = uri not in _retry_after
    _retry_after[uri] = time.monotonic() + cool_off
    if first:
        say(f"MLflow at {uri} is not answering ({str(error).splitlines()[0][:200]}); training goes on and metrics "
            f"are kept in {path.parent} until it is back (tried again every {cool_off:g}s and at the end)")


def _send_new(uri: str, run_id: str, points: list) -> int:
    """Send the points the run does not have yet; returns how many were sent."""
    seen = _logged_points(uri, run_id)
    new = []
    for p in points:
        if (p.key, p.step) not in seen:
            seen.add((p.key, p.step))
            new.append(p)
    try:
        for i in range(0, len(new), 500):
            _log_batch(uri, run_id, new[i: i + 500])
    except TrackingUnavailable:
        seen.difference_update((p.key, p.step) for p in new)
        raise
    if uri in _retry_after:
        del _retry_after[uri]
    return len(new)


def _logged_points(uri: str, run_id: str) -> set[tuple[str, int]]:
    """The run's (key, step) points on the server, read once per process (a resumed run has a history)."""
    if (uri, run_id) in _logged:
        return _logged[(uri, run_id)]
    if uri.startswith(("http://", "https://")):
        run = _rest(uri, "/api/2.0/mlflow/runs/get", "GET", params={"run_id": run_id})["run"]
        seen = set()
        for key in {m["key"] for m in run.get("data", {}).get("metrics", [])}:
            page: dict = {}
            while True:
                out = _rest(uri, "/api/2.0/mlflow/metrics/get-history", "GET",
                            params={"run_id": run_id, "metric_key": key, **page})
                seen.update((key, int(m.get("step", 0))) for m in out.get("metrics", []))
                if not out.get("next_page_token"):
                    break
                page = {"page_token": out["next_page_token"]}
    else:
        c = client(uri)
        keys = list(_call(lambda: c.get_run(run_id).data.metrics))
        seen = {(k, m.step) for k in keys for m in _call(lambda k=k: c.get_metric_history(run_id, k))}
    _logged[(uri, run_id)] = seen
    return seen


def _call(fn):
    """An MLflow call; a transport failure or a server error becomes TrackingUnavailable, a client error (a bad
    request, an unknown run: a bug, not an outage) is raised as it is."""
    # deferred: mlflow (and requests under it) is a 2 s import that only world rank 0 needs
    import requests
    from mlflow.exceptions import MlflowException

    try:
        return fn()
    except MlflowException as e:
        status = e.get_http_status_code()
        if 400 <= status < 500 and status != 429:
            raise
        raise TrackingUnavailable(str(e)) from None
    except (requests.exceptions.RequestException, OSError) as e:
        raise TrackingUnavailable(str(e)) from None


def _rest(uri: str, endpoint: str, method: str, **kwargs) -> dict:
    """One request to a tracking server with a retry budget of our own (MLflow's default waits minutes, and this is
    the training path): FORGETLESS_TRACKING_RETRIES retries (default 3, backoff about 2-4-8 s), 10 s per request."""
    # deferred: mlflow is a 2 s import that only world rank 0 needs
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    retries = int(_env_number("FORGETLESS_TRACKING_RETRIES", 3))
    timeout = int(_env_number("FORGETLESS_TRACKING_TIMEOUT_S", 10))
    response = _call(lambda: verify_rest_response(http_request(
        get_default_host_creds(uri), endpoint, method, max_retries=retries, backoff_factor=1, backoff_jitter=0.5,
        timeout=timeout, **kwargs), endpoint))
    return response.json() if response.content else {}


def _log_batch(uri: str, run_id: str, points: list) -> None:
    # deferred: mlflow is a 2 s import that only world rank 0 needs
    from mlflow.entities import Metric

    if uri.startswith(("http://", "https://")):
        _rest(uri, "/api/2.0/mlflow/runs/log-batch", "POST", json={"run_id": run_id, "metrics": [
            {"key": p.key, "value": p.value, "timestamp": p.timestamp, "step": p.step} for p in points]})
    else:
        _call(lambda: client(uri).log_batch(run_id, metrics=[Metric(p.key, p.value, p.timestamp, p.step)
                                                             for p in points]))


def _flush_run(uri: str, run_id: str) -> int:
    """Send a run's buffered points (oldest first); returns how many were sent. Raises TrackingUnavailable."""
    sent = 0
    for path in metric_buffer.pending_files(run_id):
        file_uri, points = metric_buffer.read(path)
        if file_uri != uri:
            continue
        sent += _send_new(uri, run_id, points)
        metric_buffer.done(path)
    return sent


def flush_buffered(uri: str, wait_s: float | None = None) -> int:
    """At the end of an invocation: send every buffered point of tracking server `uri`, waiting at most `wait_s`
    (default FORGETLESS_TRACKING_FLUSH_WAIT_S, 120 s) for the server to answer again. What still cannot be sent
    stays on disk, said with its folder, and goes with the next forgetless command that logs to the run."""
    runs = metric_buffer.pending_runs(uri)
    if not runs:
        return 0
    wait_s = _env_number("FORGETLESS_TRACKING_FLUSH_WAIT_S", 120) if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    sent = 0
    while True:
        try:
            for run_id in list(runs):
                sent += _flush_run(uri, run_id)
                runs.remove(run_id)
            if sent:
                say(f"MLflow at {uri} is back: sent {sent} buffered metric points")
            return sent
        except TrackingUnavailable as e:
            if time.monotonic() >= deadline:
                left = sum(metric_buffer.count_pending(r) for r in runs)
                say(f"MLflow at {uri} still does not answer after {wait_s:g}s ({str(e).splitlines()[0][:200]}); "
                    f"{left} metric points stay in {metric_buffer.root()} and are sent by the next forgetless "
                    f"command that logs to the same runs")
                return sent
            say(f"waiting for MLflow at {uri} to send {sum(metric_buffer.count_pending(r) for r in runs)} buffered "
                f"metric points (at most {max(0.0, deadline - time.monotonic()):.0f}s more)")
            time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
