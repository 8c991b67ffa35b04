"""Metric points into MLflow runs from the training path: never a duplicate point (a resumed run's history is read
once per process), never a stop of training (a tracking outage sends the points to the on-disk buffer,
metric_buffer, and they are sent when the server answers again or at the end of the invocation).
"""
from __future__ import annotations

import math
import os
import time

from forgetless._compat import mlflow as compat_mlflow
from forgetless.console import say
from forgetless.platform.tracking import metric_buffer
from forgetless.platform.tracking.mlflow_store import client


class TrackingUnavailable(Exception):
    """The tracking server did not answer (down, restarting, 5xx, timeouts) within the retry budget."""


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
    if uri.startswith(("http://", "https://")) and compat_mlflow.rest_available():
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
    the training path): FORGETLESS_TRACKING_RETRIES retries (default 3, backoff about 2-4-8 s), 10 s per request. Only
    where MLflow's seam is active (`compat_mlflow.rest_available()`); else MlflowClient's calls, with MLflow's budget."""
    retries = int(_env_number("FORGETLESS_TRACKING_RETRIES", 3))
    timeout = int(_env_number("FORGETLESS_TRACKING_TIMEOUT_S", 10))
    return _call(lambda: compat_mlflow.rest_json(uri, endpoint, method, retries, timeout, **kwargs))


def _log_batch(uri: str, run_id: str, points: list) -> None:
    # deferred: mlflow is a 2 s import that only world rank 0 needs
    from mlflow.entities import Metric

    if uri.startswith(("http://", "https://")) and compat_mlflow.rest_available():
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
