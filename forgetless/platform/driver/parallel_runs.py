"""Independent Ray Train runs side by side, where the cluster has room for more than one.

A compare's strategy runs (and its seeds) do not depend on each other: each is its own `TorchTrainer.fit()`, which
Ray schedules on the cluster's resources. The driver starts up to `concurrency` of them at once, each from its own
thread (Ray Train runs a fit from any thread; only the main thread's fit registers Ray Train's Ctrl-C handler, and a
driver that is stopped ends the runs it started, whose committed checkpoints stay: the same command resumes them).
With room for one run, or `scaling.max_concurrent: 1`, they run one after another in the main thread, as before.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, TypeVar

import ray

from forgetless.config import ExperimentConfig
from forgetless.console import say

T = TypeVar("T")


def runs_that_fit(cfg: ExperimentConfig, cluster: dict[str, float] | None = None) -> int:
    """How many of cfg's runs the cluster holds at once (its total CPUs and GPUs; at least 1), each at its most
    workers (an elastic run's max: side-by-side runs would otherwise keep each other small)."""
    resources = ray.cluster_resources() if cluster is None else cluster
    fits = int(resources.get("CPU", 0.0) // (cfg.scaling.num_workers * cfg.scaling.cpus_per_worker))
    if cfg.scaling.use_gpu:
        fits = min(fits, int(resources.get("GPU", 0.0) // cfg.scaling.num_workers))
    return max(fits, 1)


def concurrency(cfg: ExperimentConfig, runs: int, cluster: dict[str, float] | None = None) -> int:
    """Runs at once: `scaling.max_concurrent` (0 = as many as fit), never more than fit nor than there are runs."""
    fits = runs_that_fit(cfg, cluster)
    wanted = cfg.scaling.max_concurrent or fits
    if wanted > fits:
        say(f"scaling.max_concurrent={wanted}: the cluster fits {fits} run(s) of {cfg.scaling.num_workers} workers "
            f"at once; running {fits}")
    return max(1, min(wanted, fits, runs))


def run_all(calls: list[Callable[[], T]], concurrency: int, on_done: Callable[[T], None] | None = None) -> list[T]:
    """Every call's result, in call order; up to `concurrency` calls at once. `on_done` sees each result as it comes
    (in the calling thread). After a failure no further call starts; the running ones finish, then it is raised."""
    if concurrency <= 1 or len(calls) <= 1:
        results = []
        for call in calls:
            results.append(call())
            if on_done:
                on_done(results[-1])
        return results
    return _run_threaded(calls, concurrency, on_done)


def _run_threaded(calls: list[Callable[[], T]], concurrency: int, on_done: Callable[[T], None] | None) -> list[T]:
    results: list = [None] * len(calls)
    finished: queue.Queue = queue.Queue()

    def work(i: int) -> None:
        try:
            results[i] = calls[i]()
            finished.put((i, None))
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread, which raises it
            finished.put((i, e))

    pending, running, failure = list(range(len(calls))), 0, None
    while pending or running:
        while pending and running < concurrency and failure is None:
            # daemon: a driver stopped mid-way (Ctrl-C) exits without waiting for the runs' threads
            threading.Thread(target=work, args=(pending.pop(0),), daemon=True, name="forgetless-run").start()
            running += 1
        if running == 0:
            break
        i, error = _next_finished(finished)
        running -= 1
        if error is not None:
            failure = failure or error
        elif on_done:
            on_done(results[i])
    if failure is not None:
        raise failure
    return results


def _next_finished(finished: queue.Queue):
    while True:  # a bounded get, so that Ctrl-C reaches the calling thread
        try:
            return finished.get(timeout=0.5)
        except queue.Empty:
            continue
