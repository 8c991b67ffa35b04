"""The TorchTrainer forgetless fits with: Ray Train V2 without the helper processes forgetless has no use for.

Besides the Train controller and one process per worker, every `TorchTrainer.fit()` of Ray Train V2 (2.60) starts
helper actors, each a Python process that imports Ray Train (and Ray Data) on the driver's node. Measured on a 2-core
machine with `benchmarks/train_floor.py` (an empty train function) and the task timeline of `ray.util.state`:

- a **`DatasetManager`** that serves Ray Datasets passed as `datasets=` to the trainer. forgetless passes none (the
  workers get their tasks through the object store, platform/worker/shared_tasks.py), yet the actor is started for every
  fit and the workers' `init_train_context` waits on it: ~5 s of every run's start. Without datasets its callback is
  left out (the workers' train context then has no dataset shard provider, which only `get_dataset_shard` uses).
- a detached **`PlacementGroupCleaner`** that watches the controller once a second and removes the run's placement
  group if the controller dies without removing it (Ray keeps the group for as long as the job lives): ~1-4 s of
  every run (its start competes with the workers' on 2 cores; the controller waits for it to stop at the end). It
  asks Ray's state API whether the controller lives, which needs the dashboard: on an embedded cluster (no dashboard
  unless asked) it could not tell, printed a warning a second and never cleaned anything. On an embedded cluster
  (if the driver dies, the reaper ends the whole cluster) the job is done without a process: a callback in the
  controller records each placement group it creates in a file of the cluster's session folder named after the
  process that called `fit()`, which removes any recorded group still there once `fit()` returns or raises
  (`cleaned_after_the_fit`); if that process died (a Tune trial's, killed with its controller), the driver removes
  its groups after the trial (`remove_groups_of_dead_processes`). A cluster of your own keeps Ray Train's cleaner.

- the **`AutoscalingCoordinator`** (a detached actor of Ray Data's) that each fit sends its resource request to, for a
  cluster autoscaler; the cluster's first fit starts it and its controller waits for it (up to 5 s) before it starts
  any worker. An embedded cluster has no autoscaler: there the request is not sent and the actor never starts
  (measured 1-4 s off the first run of every invocation: benchmarks/first_fit.py).
- the **torch import in the Train controller**: Ray's TorchConfig (in the trainer's backend config and two of its
  callbacks) makes the controller import torch, ~2-5 s before it starts any worker, for a process that runs no torch.
  `controller_parts.WorkerProcessGroupConfig` sets up the same process group with the torch steps on the workers.

- the **Train controller's own process**, started for every fit: its spawn, `import ray` and Ray Train's imports come
  before any worker starts. Where the driver outlives its fits (an embedded cluster), `ControllerHosts` keeps one
  process per concurrent fit (`controller_parts.ControllerHost`, owned by the driver, so it ends with it) and runs
  each fit's `TrainController` in it: the process is started by the first fit and used by the ones after it. A Tune
  search's driver lends one of these hosts to each trial slot (`ControllerHosts.lend`): a trial process runs its fit
  there (`controllers_in`), and where Tune ends a trial whose fit still runs (its process died), the driver aborts the
  fit in the host (`ControllerHost.abort_fit`), which keeps its process for the slot's next trial.

This leans on Ray Train V2 internals (the trainer's list of default callbacks, the worker group's placement group
handle, the controller's classes): they are all in the Ray Train seam (_compat/ray_train.py, _compat/ray_trainer.py).
Where the seam is off (another Ray, or FORGETLESS_PUBLIC_PATHS=1: `replaceable()` is false) `fit` runs Ray's own
TorchTrainer and TorchConfig, unchanged.

One embedded cluster per process: `CONTROLLER_HOSTS` (this module) and the embedded cluster (ray_cluster.py) are kept
after run() / compare() / tune() return, as ray.init keeps Ray initialised, so that the next call in the same process
(a notebook) reuses the cluster and its controller processes; they end with the cluster (ray.shutdown, or the end of
the process). Hosts are keyed by the cluster's address and job: a later cluster never gets an earlier one's.
"""
from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from pathlib import Path

import ray
from ray.train.torch import TorchTrainer
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from forgetless._compat import ray_core, ray_train
from forgetless._compat.ray_trainer import LeanTorchTrainer, replaceable  # noqa: F401 - also used as lean_trainer.X
from forgetless.console import say
from forgetless import process_lifetime as reaper
from forgetless.platform.driver.train_controller import ControllerHost
from forgetless.platform.kept_actors import KeptActors

logger = logging.getLogger(__name__)


# How long a kept controller process may take to answer before a new one is started in its place.
HOST_READY_TIMEOUT_S = 30.0


# What Ray Train gives its controller's environment (as a runtime_env) unless the user set it: no warning for the
# blocking calls the controller makes in its event loop by design.
BLOCKING_GET_WARNING_VARIABLE = ray_train.BLOCKING_GET_WARNING_VARIABLE
BLOCKING_GET_WARNING_DEFAULT = ray_train.BLOCKING_GET_WARNING_DEFAULT


class ControllerHosts:
    """The idle `ControllerHost` actors of this driver, by cluster, node and the environment Ray Train gives a
    controller (`ray_train.controller_env_vars`, read per fit: a host only runs fits whose controller would have had its
    environment). A fit takes an idle host or starts one (as Ray starts a controller: no CPUs, on the driver's node)
    and gives it back when it returns; a host whose fit raised (its process died, or the fit was aborted) is not kept.
    Hosts are not detached: they end with the driver.

    A variable every process of the cluster already has (`cluster_environment`: an embedded cluster's, inherited
    from its raylet) is not given again as a runtime_env: a host without one starts as a plain Ray worker process,
    and so do the processes its controller starts (they inherit the host's runtime_env;
    controller_parts.InheritedEnvWorkerGroup leaves out what the workers inherit anyway)."""

    def __init__(self):
        self._kept = KeptActors()
        self._cluster_env: dict[str, dict[str, str]] = {}

    def cluster_environment(self, gcs_address: str, env: dict[str, str]) -> None:
        """Every process of the cluster at `gcs_address` has these variables (its raylet's environment)."""
        self._cluster_env[gcs_address] = dict(env)

    def run(self, controller_kwargs: dict, register_sigint_handler):
        env_vars = ray_train.controller_env_vars()  # as Ray's controller start
        key, host = self._take(env_vars)
        if threading.current_thread() is threading.main_thread():
            register_sigint_handler(host)  # Ctrl-C aborts the fit through the host, as through Ray's controller
        try:
            result = ray.get(host.run.remote(controller_kwargs))
        except BaseException:
            ray.kill(host)  # best effort: it may be gone already; never handed to another fit
            raise
        self._kept.keep(key, host)
        return result

    def _take(self, env_vars: dict[str, str]):
        context = ray.get_runtime_context()
        node_id, cluster = context.get_node_id(), context.gcs_address
        inherited = self._cluster_env.get(cluster, {})
        env_vars = {k: v for k, v in env_vars.items() if inherited.get(k) != v}
        key = (cluster, context.get_job_id(), node_id, tuple(sorted(env_vars.items())))
        host = self._kept.take(key, lambda h: h.ready.remote(), HOST_READY_TIMEOUT_S, dropped=lambda e: say(
            f"a kept Train controller process did not answer in {HOST_READY_TIMEOUT_S:.0f} s ({type(e).__name__}); "
            f"starting a new one"))
        if host is None:
            host = ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                              runtime_env={"env_vars": env_vars} if env_vars else None)(ControllerHost).remote()
        return key, host


    def lend(self, n: int) -> list[tuple[tuple, object]]:
        """`n` hosts (idle ones first) for fits that other processes of the cluster run (a Tune search's trial slots:
        `controllers_in`), as (key, actor handle); `take_back` returns them. A new host's process starts now, while the
        caller goes on."""
        env_vars = ray_train.controller_env_vars()  # as Ray's controller start, read once for all of them
        return [self._take(env_vars) for _ in range(n)]

    def take_back(self, lent: list[tuple[tuple, object]]) -> None:
        """Hosts `lend` gave out: an idle one is kept for the next fit, a busy or dead one is ended."""
        for key, host in lent:
            self._kept.give_back(key, host, lambda h: h.idle.remote(), HOST_READY_TIMEOUT_S)


CONTROLLER_HOSTS = ControllerHosts()  # this driver's: fits of every thread share it


class LentHost:
    """A `ControllerHost` another process lent this one (a Tune search's driver, to the trial holding one of its
    slots), as LeanTorchTrainer's `controller_hosts`: the fit's controller runs there, under `owner` (the trial's id:
    the driver aborts the fit of a trial Tune reports dead by it, `ControllerHost.abort_fit`)."""

    def __init__(self, host, owner: str):
        self.host, self.owner = host, owner

    def run(self, controller_kwargs: dict, register_sigint_handler):
        return ray.get(self.host.run.remote(controller_kwargs, owner=self.owner))


_LENT_HOST: ContextVar[LentHost | None] = ContextVar("forgetless_lent_controller_host", default=None)


@contextmanager
def controllers_in(host, owner: str):
    """Inside the block, the fits this thread runs on the embedded cluster run their Train controller in `host` (a
    ControllerHost actor handle another process owns), as `owner`."""
    token = _LENT_HOST.set(LentHost(host, owner))
    try:
        yield
    finally:
        _LENT_HOST.reset(token)


def fit(train_fn, embedded_cluster: bool, started_it: bool | None = None, **trainer_kwargs):
    """`LeanTorchTrainer(train_fn, **trainer_kwargs).fit()`. On an `embedded_cluster` (one driver's local cluster: no
    autoscaler) no resource requests are sent, and no PlacementGroupCleaner process is started: the calling process
    removes what the run's controller left behind once the fit returns or raises (`cleaned_after_the_fit`), and the
    cluster's driver removes what a calling process that died left (`remove_groups_of_dead_processes`, after each Tune
    trial). Where this process `started_it` (default: `embedded_cluster`), the run's controller also runs in a process
    this one keeps for its next fit; a process inside the cluster (a Tune trial) gets a controller process per fit,
    since it can die on its own, unless it runs the fit inside `controllers_in(host)` (a host its driver lent it)."""
    started_it = embedded_cluster if started_it is None else started_it
    with handlers_kept(signal.SIGINT):
        if not replaceable():  # the Ray Train seam is off: Ray's own trainer, its controller and its helper actors
            return TorchTrainer(train_fn, **trainer_kwargs).fit()
        with cleaned_after_the_fit() if embedded_cluster else nullcontext() as record_file:
            return LeanTorchTrainer(train_fn, record_file=record_file, asks_autoscaler=not embedded_cluster,
                                    controller_hosts=CONTROLLER_HOSTS if started_it else _LENT_HOST.get(), **trainer_kwargs).fit()


@contextmanager
def handlers_kept(*signals: signal.Signals):
    """The calling thread's handlers of `signals` as they were once the block returns or raises. Ray sets its own:
    ray.init a SIGTERM handler (sys.exit), every fit of Ray Train a SIGINT one (Ctrl-C aborts the run gracefully),
    and leaves them set. Only the main thread sets handlers: elsewhere nothing changes, nothing is restored."""
    main = threading.current_thread() is threading.main_thread()
    before = {s: signal.getsignal(s) for s in signals} if main else {}
    try:
        yield
    finally:
        for s, handler in before.items():
            if handler is not None:  # (None: a handler set outside Python, which cannot be put back)
                signal.signal(s, handler)


def remove_recorded(record_file: str) -> list[str]:
    """Remove every placement group listed in `record_file` that still exists; returns the ids removed."""
    if not os.path.exists(record_file):
        return []
    removed = []
    for line in Path(record_file).read_text().split():
        group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(line)))
        if placement_group_table(group).get("state") not in (None, "REMOVED"):
            remove_placement_group(group)
            removed.append(line)
    return removed


def record_folder() -> Path:
    """Where the fits on this node's cluster record their placement groups: in the cluster's session folder, which
    every process of the cluster (the driver, a Tune trial) finds, and which is not another cluster's."""
    folder = ray_core.cluster_folder() / "forgetless-placement-groups"  # the session folder (a Ray internal)
    folder.mkdir(exist_ok=True)
    return folder


@contextmanager
def cleaned_after_the_fit():
    """Yields the record file to give `LeanTorchTrainer` (named after this process); on the way out (the fit returned
    or raised) every placement group the run left behind is removed."""
    me = os.getpid()  # the file's name says which process (and which life of that pid) recorded it
    fd, record_file = tempfile.mkstemp(prefix=f"{me}@{reaper.started_token(me)}@", suffix=".txt", dir=record_folder())
    os.close(fd)
    try:
        yield record_file
    finally:
        try:
            _say_removed(remove_recorded(record_file), "the run's Train controller")
        finally:
            Path(record_file).unlink(missing_ok=True)


def remove_groups_of_dead_processes() -> list[str]:
    """The cluster's driver: remove the placement groups recorded by fits whose calling process died during the fit
    (a Tune trial process killed with its controller, which then never removed its workers' group); returns their
    ids. A living process's records are its running fits' (it removes them itself)."""
    removed = []
    for record_file in record_folder().glob("*.txt"):
        pid, started = record_file.name.split("@")[:2]
        if reaper.alive(int(pid), started):  # (a zombie or a later process given the same pid is not)
            continue
        removed += remove_recorded(str(record_file))
        record_file.unlink(missing_ok=True)
    _say_removed(removed, "a Tune trial's Train controller (its process died)")
    return removed


def _say_removed(removed: list[str], whose: str) -> None:
    if removed:
        say(f"removed {len(removed)} placement group(s) {whose} left behind (it ended without removing them): "
            f"{', '.join(removed)}")
