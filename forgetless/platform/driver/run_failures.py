"""A run that failed inside its workers, said in one line: which run, which worker (rank), the exception's message,
and where the full traceback is. The traceback goes to the run's `failure.log` (in the run's folder under `storage`,
beside its checkpoints), not to the console: the line on the console, the hundreds of lines in the file.

The workers write their own tracebacks (platform/worker/failure_log.py, one file a rank); this joins them, with Ray
Train's summary of the failure, into `failure.log` and raises `RunFailed` (the CLI prints it as one line, exit 1).
"""
from __future__ import annotations

import time

from ray.train import WorkerGroupError

from forgetless import storage
from forgetless.errors import RunFailed
from forgetless.platform.worker.failure_log import HEADER_MARK, rank_log_uri

FAILURE_LOG = "failure.log"
MESSAGE_CHARS = 240  # of the exception's first line, on the console


def worker_failure(run_name: str, run_uri: str, error: WorkerGroupError) -> RunFailed:
    """Write the run's failure.log and return the one-line error that names it."""
    failures = dict(sorted(error.worker_failures.items()))
    log_uri = storage.join(run_uri, FAILURE_LOG)
    written = _write_failure_log(run_name, run_uri, log_uri, failures, str(error))
    if not failures:  # (Ray raised it with no worker's error: nothing more specific to name)
        return RunFailed(f"run {run_name} failed in its workers: {_first_line(str(error))}"
                         f"{_where(log_uri, written)}")
    rank, first = next(iter(failures.items()))
    others = [r for r in failures if r != rank]
    same = all(_first_line(str(e)) == _first_line(str(first)) for e in failures.values())
    also = f" (and rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))}" \
           f"{', the same error' if same else ''})" if others else ""
    return RunFailed(f"run {run_name} failed in worker rank {rank}{also}: {type(first).__name__}: "
                     f"{_first_line(str(first))}{_where(log_uri, written)}")


def _write_failure_log(run_name: str, run_uri: str, log_uri: str, failures: dict, summary: str) -> bool:
    parts = [f"run {run_name} failed at {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC\n",
             f"Ray Train: {summary}\n"]
    for rank, error in failures.items():
        parts.append(f"\n--- worker rank {rank}: {type(error).__name__}: {error}\n")
        parts.append(_rank_traceback(run_uri, rank) or "(the worker wrote no traceback: it died, or its log could "
                                                       "not be written; Ray Train's summary above has what it saw)\n")
    try:
        storage.write_bytes(log_uri, "".join(parts).encode())
        return True
    except OSError:
        return False


def _rank_traceback(run_uri: str, rank: int) -> str | None:
    """The newest traceback a rank wrote (its log keeps those of earlier restarts of the worker group too)."""
    uri = rank_log_uri(run_uri, rank)
    try:
        text = storage.read_bytes(uri).decode(errors="replace") if storage.exists(uri) else ""
    except OSError:
        return None
    newest = max(text.rfind(HEADER_MARK), 0)
    return (text[newest:] + (f"(earlier failures of this rank: {uri})\n" if newest > 0 else "")) if text else None


def _where(log_uri: str, written: bool) -> str:
    return f"; full traceback in {log_uri}" if written else "; full traceback in the Ray workers' logs"


def _first_line(text: str) -> str:
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    return line if len(line) <= MESSAGE_CHARS else line[:MESSAGE_CHARS - 1] + "…"
