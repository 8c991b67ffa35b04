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

from ray.train.v2._internal.execution import context as ray_train_context

from forgetless import console

HARMLESS_WARNINGS = (
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
)
# Ray Train names the logger of its report line after its source file, not "ray.train" (so LoggingConfig's level
# does not reach it).
RAY_REPORT_LOGGER = ray_train_context.__file__
INFO_LOGGERS = (RAY_REPORT_LOGGER, "mlflow.system_metrics")


def quiet_worker_output() -> None:
    """In a worker, before training: the per-report lines, MLflow's INFO lines and the known warnings off."""
    if console.verbose():
        return
    for name in INFO_LOGGERS:
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
