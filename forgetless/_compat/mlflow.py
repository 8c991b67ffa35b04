"""MLflow internals forgetless uses, and their public paths. Written and tested for MLflow 3.17 (range below).

- `create_store_schema`: MLflow's own creation of a SQLite store's tables (`mlflow.store.db.utils._initialize_tables`),
  run once per MLflow version into an empty template store that new stores are copied from
  (tracking/mlflow_store.seed_new_sqlite_store). Public path: no template; MLflow creates each new store itself
  (~2 s per new store on 2 cores: its ~200 schema migrations).
- `rest_json`: one REST call to a tracking server with forgetless's own retry budget (`mlflow.utils.rest_utils`), so a
  tracking outage costs the training loop seconds before metrics go to the on-disk buffer. Public path: the calls go
  through `MlflowClient`, whose retry budget (MLFLOW_HTTP_REQUEST_MAX_RETRIES, minutes by default) comes first.
- `start_system_metrics`: MLflow's `SystemMetricsMonitor` (CPU, memory, disk, network, GPU) sampled from a thread of
  the worker, with one sample logged at once (MLflow logs only after a full interval). Public path: a thread of
  forgetless's own samples CPU and memory with psutil (no disk, network or GPU metrics).
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from forgetless._compat import Seam

LOW, BELOW = "3.17", "3.18"  # written and tested with 3.17.2


def _probe() -> bool:
    # deferred: mlflow is a 2 s import that only the processes that track need
    from mlflow.store.db import utils
    from mlflow.system_metrics import system_metrics_monitor
    from mlflow.utils import rest_utils

    return all(callable(f) for f in (utils._initialize_tables, system_metrics_monitor.SystemMetricsMonitor,
                                     rest_utils.http_request, rest_utils.verify_rest_response))


SEAM = Seam("MLflow", "mlflow", LOW, BELOW, probe=_probe,
            slower="each new SQLite store is created by MLflow's migrations (~2 s), a tracking outage waits MLflow's "
                   "own retry budget before metrics are buffered, system metrics are CPU and memory only")


def create_store_schema(engine) -> bool:
    """Create MLflow's tables in an empty SQLAlchemy `engine`'s database; False on the public path (nothing done:
    MLflow creates a store itself when it first opens it)."""
    if not SEAM.active():
        return False
    from mlflow.store.db.utils import _initialize_tables

    _initialize_tables(engine)
    return True


def rest_available() -> bool:
    """Whether `rest_json` can be used (else: MlflowClient's calls)."""
    return SEAM.active()


def rest_json(uri: str, endpoint: str, method: str, retries: int, timeout_s: int, **kwargs) -> dict:
    """One request to the tracking server at `uri` with `retries` retries (backoff about 2-4-8 s) and `timeout_s` per
    request; the response's JSON. Raises MLflow's or requests' errors. Only where `rest_available()`."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    response = verify_rest_response(http_request(
        get_default_host_creds(uri), endpoint, method, max_retries=retries, backoff_factor=1, backoff_jitter=0.5,
        timeout=timeout_s, **kwargs), endpoint)
    return response.json() if response.content else {}


def start_system_metrics(uri: str, run_id: str, interval_s: float,
                         log_metrics: Callable[[dict[str, float], int], None]) -> Any:
    """Sample system metrics into the run's `system/...` metrics every `interval_s` from a daemon thread of this
    process, until it ends; one sample at step 0 now (a run shorter than the interval still has one). Returns what
    samples (its `.finish()` stops it)."""
    if not SEAM.active():
        return _PublicSampler(interval_s, log_metrics).start()
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    sampler = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=uri)
    sampler.collect_metrics()
    log_metrics({f"system/{k}": float(v) for k, v in sampler.aggregate_metrics().items()}, 0)
    # Built after that sample is in, so that its steps go on after it (built first, it logged a second step 0).
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=uri)
    monitor.start()
    return monitor


class _PublicSampler:
    """CPU and memory, as MLflow's CPU monitor names them, from psutil (public), every interval_s."""

    def __init__(self, interval_s: float, log_metrics: Callable[[dict[str, float], int], None]):
        self.interval_s, self.log_metrics = interval_s, log_metrics
        self._stop = threading.Event()

    @staticmethod
    def sample() -> dict[str, float]:
        import psutil

        memory = psutil.virtual_memory()
        return {"system/cpu_utilization_percentage": float(psutil.cpu_percent()),
                "system/system_memory_usage_megabytes": memory.used / 1e6,
                "system/system_memory_usage_percentage": memory.used / memory.total * 100}

    def start(self) -> "_PublicSampler":
        self.log_metrics(self.sample(), 0)
        threading.Thread(target=self._loop, name="forgetless-system-metrics", daemon=True).start()
        return self

    def _loop(self) -> None:
        step = 1
        while not self._stop.wait(self.interval_s):
            try:
                self.log_metrics(self.sample(), step)
            except Exception:  # noqa: BLE001 - sampling is best effort, never the run's failure
                pass
            step += 1

    def finish(self) -> None:
        self._stop.set()
