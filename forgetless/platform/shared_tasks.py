"""A stream's tasks built once by the driver and handed to the Ray Train workers through Ray's object store.

Building a stream means reading its data (local files, s3://) and, for causal-LM tasks, tokenising whole corpora: the
driver does it anyway before anything starts (`runner.preflight`, so a bad file fails before Ray), and every worker of
every run did it again. Now the driver's tasks go into the object store once per Ray Train run and the workers read
them from there; a worker given no reference (a job built by hand) still builds its own.
"""
from __future__ import annotations

import json

import ray

from forgetless.config import ExperimentConfig
from forgetless.data import TaskData, build_stream

# the tasks the driver built last, keyed by their configs: preflight rebuilds them at every compare/run/tune call, so a
# data file changed between two calls of one Python session is read again
_BUILT: dict[str, list[TaskData]] = {}
GET_TIMEOUT_S = 600


def stream_key(cfg: ExperimentConfig) -> str:
    return json.dumps([t.model_dump(mode="json") for t in [cfg.source, *cfg.targets]], sort_keys=True)


def remember(cfg: ExperimentConfig, tasks: list[TaskData]) -> None:
    _BUILT.clear()  # one stream at a time: a long Python session keeps no earlier data alive
    _BUILT[stream_key(cfg)] = tasks


def built_stream(cfg: ExperimentConfig) -> list[TaskData]:
    """The stream of `cfg`: the one the driver built last if its configs are the same, else built now."""
    key = stream_key(cfg)
    if key not in _BUILT:
        remember(cfg, build_stream(cfg.source, cfg.targets))
    return _BUILT[key]


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
