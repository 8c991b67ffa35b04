"""A worker's failure in the run's own log instead of on the console.

Ray Train prints the traceback of a failed training function from every rank to the driver's console (its
"Error in training function:" record, ~20 lines a rank, repeated for each restart of the worker group), and the driver
then prints it again inside Ray's WorkerGroupError. Here each rank appends its full traceback to
`<run folder>/failure/rank<N>.log` (local or s3://, next to the run's checkpoints) and keeps Ray's record off the
console; the driver (platform/driver/run_failures.py) then says in one line which run and which worker failed, with
what, and where the traceback is. With `forgetless --verbose`, or when the log cannot be written, Ray's record
prints as before.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import traceback

import ray.train

from forgetless import console, storage
from forgetless._compat import ray_train as ray_train_seam
from forgetless.platform.worker.job import WorkerJob
from forgetless.platform.worker.train_loop import train_worker

FAILURE_FOLDER = "failure"
RAY_TRAIN_ERROR_PREFIX = "Error in training function"
HEADER_MARK = "=== failure at "  # starts each traceback a rank appends


def rank_log_uri(run_uri: str, rank: int) -> str:
    return storage.join(run_uri, FAILURE_FOLDER, f"rank{rank}.log")


def run_uri_of(job: WorkerJob) -> str:
    """The run's folder (the driver gives workers the absolute storage path)."""
    return storage.join(storage.normalize(job.config.storage), job.run_name)


def train_worker_logging_failures(job: WorkerJob) -> None:
    """`train_worker`, with its exception's traceback appended to this rank's failure log before it propagates."""
    try:
        train_worker(job)
    except Exception as e:
        if _append_traceback(job, e) and not console.verbose():
            _keep_ray_traceback_off_the_console()
        raise


def _append_traceback(job: WorkerJob, error: Exception) -> bool:
    """Append the traceback to this rank's log (kept across restarts of the worker group); False if it cannot be."""
    try:
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        uri = rank_log_uri(run_uri_of(job), rank)
        header = (f"{HEADER_MARK}{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC: run {job.run_name}, worker rank "
                  f"{rank} of {world}, pid {os.getpid()} on {socket.gethostname()} ===\n")
        text = header + "".join(traceback.format_exception(error)) + "\n"
        earlier = storage.read_bytes(uri) if storage.exists(uri) else b""
        storage.write_bytes(uri, earlier + text.encode())
        return True
    except Exception:  # noqa: BLE001 - the log is a convenience: the training error must propagate whatever happens
        return False


class _DropWrittenTraceback(logging.Filter):
    """Ray Train's record of the training function's traceback, which this rank's failure log holds."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(RAY_TRAIN_ERROR_PREFIX)


def _keep_ray_traceback_off_the_console() -> None:
    name = ray_train_seam.train_error_logger_name()  # (None on another Ray: its record then prints, as before)
    if name is None:
        return
    logger = logging.getLogger(name)
    if not any(isinstance(f, _DropWrittenTraceback) for f in logger.filters):
        logger.addFilter(_DropWrittenTraceback())
