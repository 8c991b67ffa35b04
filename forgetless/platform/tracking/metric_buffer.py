"""Metric points MLflow could not take when they were logged, kept on disk until it can.

A tracking outage must never stop training: `tracking.log_metrics` appends the points it could not send here and sends
them (oldest first) the next time the server answers, or at the end of the invocation (`tracking.flush_buffered`).
One folder per MLflow run, one JSON-lines file per failed batch, each line one point {key, value, timestamp, step}
plus the tracking URI it belongs to; a file is deleted only once every point in it reached the server.

The folder is local to the machine (`FORGETLESS_METRIC_BUFFER`, default ~/.cache/forgetless/metric-buffer): writing a
point must not depend on a network either. On a multi-node cluster, points buffered by a worker on another node are
sent by that node's next forgetless process that logs to the same run.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BUFFER_ENV = "FORGETLESS_METRIC_BUFFER"


@dataclass(frozen=True)
class MetricPoint:
    key: str
    value: float
    timestamp: int  # milliseconds since the epoch, as MLflow stores it
    step: int


def root() -> Path:
    return Path(os.environ.get(BUFFER_ENV) or Path.home() / ".cache" / "forgetless" / "metric-buffer")


def run_folder(run_id: str) -> Path:
    return root() / run_id


def append(uri: str, run_id: str, points: list[MetricPoint]) -> Path:
    """Keep `points` of run `run_id` (tracking server `uri`) on disk; returns the file written."""
    folder = run_folder(run_id)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns()}-{os.getpid()}.jsonl"
    tmp = folder / f".{name}.tmp"
    tmp.write_text("".join(json.dumps({"uri": uri, **asdict(p)}) + "\n" for p in points))
    os.replace(tmp, folder / name)  # a reader never sees half a file
    return folder / name


def pending_files(run_id: str) -> list[Path]:
    """The buffered batches of one run, oldest first."""
    folder = run_folder(run_id)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.jsonl"))


def pending_runs(uri: str) -> list[str]:
    """Every run with buffered points for tracking server `uri`."""
    if not root().is_dir():
        return []
    return sorted(f.name for f in root().iterdir() if f.is_dir() and any(
        read(p)[0] == uri for p in pending_files(f.name)))


def read(path: Path) -> tuple[str, list[MetricPoint]]:
    """(tracking URI, points) of one buffered batch."""
    uri, points = "", []
    for line in path.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            uri = d.pop("uri")
            points.append(MetricPoint(**d))
    return uri, points


def count_pending(run_id: str) -> int:
    return sum(len(read(p)[1]) for p in pending_files(run_id))


def done(path: Path) -> None:
    """Every point of this batch reached the server."""
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()  # the last batch of the run: leave no empty folder behind
    except OSError:
        pass
