"""A stream's tasks built once by the driver and handed to the Ray Train workers through Ray's object store.

Building a stream means reading its data (local files, s3://) and, for causal-LM tasks, tokenising whole corpora: the
driver does it anyway before anything starts (`preflight.preflight`, so a bad file fails before Ray), and every worker of
every run did it again. Now the driver's tasks go into the object store once per Ray Train run and the workers read
them from there; a worker given no reference (a job built by hand) still builds its own.
"""
from __future__ import annotations

import json
import threading

import ray

from forgetless.config import ExperimentConfig
from forgetless.data import TaskData, build_stream

# the streams the driver built last, keyed by their configs (a compare's runs fan out over threads: a lock, and a few
# kept, not one). preflight rebuilds the stream at every compare/run/tune call, so a data file changed between two
# calls of one Python session is read again.
_BUILT: dict[str, list[TaskData]] = {}
_LOCK = threading.Lock()
KEEP = 4
GET_TIMEOUT_S = 600


def stream_key(cfg: ExperimentConfig) -> str:
    return json.dumps([t.model_dump(mode="json") for t in [cfg.source, *cfg.targets]], sort_keys=True)


def remember(cfg: ExperimentConfig, tasks: list[TaskData]) -> None:
    key = stream_key(cfg)
    with _LOCK:
        _BUILT.pop(key, None)
        _BUILT[key] = tasks
        while len(_BUILT) > KEEP:  # a long Python session keeps no more than a few streams alive
            _BUILT.pop(next(iter(_BUILT)))


def built_stream(cfg: ExperimentConfig) -> list[TaskData]:
    """The stream of `cfg`: the one the driver built for the same configs, else built now."""
    with _LOCK:
        tasks = _BUILT.get(stream_key(cfg))
    if tasks is None:
        tasks = build_stream(cfg.source, cfg.targets)
        remember(cfg, tasks)
    return tasks


def share(cfg: ExperimentConfig) -> ray.ObjectRef:
    """The stream in the object store, for the workers of one run (the reference lives as long as the run's job)."""
    return ray.put(built_stream(cfg))


def fetch(ref: ray.ObjectRef) -> list[TaskData]:
    """A worker's copy of the driver's tasks; bounded, and it says what it waited for."""
    try:
        return ray.get(ref, timeout=GET_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(f"the stream's tasks did not arrive from the driver's object store within {GET_TIMEOUT_S} s "
                           f"(is the driver alive, and can this node reach it?)") from None
