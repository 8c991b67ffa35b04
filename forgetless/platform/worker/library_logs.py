"""What library chatter a Ray Train worker keeps off the console unless `forgetless --verbose` (console.verbose).

Off by default, because it reached the driver from every rank and buried the progress lines: Ray Train's
"Reporting training result N: TrainingReport(...)" line per checkpoint and rank, DeepSpeed's "op built successfully"
print when it loads its C++ op, MLflow's system-metrics start lines, and two FutureWarnings torch raises for the
collectives DeepSpeed calls (DeepSpeed's to change, harmless here). Warnings and errors of every library still show.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Iterator

from forgetless import console
from forgetless._compat import ray_train

HARMLESS_WARNINGS = (
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
)
# MLflow's system-metrics start lines; Ray Train's report line has a logger named after a Ray internal's source file
# (ray_train.report_logger_name; where that seam is off the line stays).
INFO_LOGGERS = ("mlflow.system_metrics",)


def quiet_worker_output() -> None:
    """In a worker, before training: the per-report lines, MLflow's INFO lines and the known warnings off."""
    if console.verbose():
        return
    for name in (*INFO_LOGGERS, ray_train.report_logger_name()):
        if name:
            logging.getLogger(name).setLevel(logging.WARNING)
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


@contextlib.contextmanager
def prints_hidden() -> Iterator[None]:
    """Hide what a block prints (DeepSpeed's op-load line). Ray Train turns a worker's print into an INFO record of
    the root logger, so both that and stdout are held back for the block."""
    if console.verbose():
        yield
        return
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)
