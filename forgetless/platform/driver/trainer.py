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
  each fit's `TrainController` in it: the process is started by the first fit and used by the ones after it.

This leans on Ray Train V2 internals (the trainer's list of default callbacks, the worker group's placement group
handle); where they are not as expected (`replaceable()` is false) the trainer is left as Ray made it.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path

import ray
from ray.train.torch import TorchTrainer
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from forgetless.console import say
from forgetless import process_lifetime as reaper
from forgetless.platform.driver.train_controller import (ControllerHost, FixedScalingPolicy, InheritedEnvTrainController,
                                                    NoAutoscalerScalingPolicy, RecordPlacementGroups,
                                                    WorkerProcessGroupConfig)

logger = logging.getLogger(__name__)

try:  # Ray Train V2 internals (ray 2.60); without them nothing changes
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
    from ray.train.v2._internal.constants import (DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
                                                  get_env_vars_to_propagate)
except ImportError:  # pragma: no cover - another Ray version
    DatasetsCallback = PlacementGroupCleanerCallback = get_env_vars_to_propagate = None
    RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE = (
        "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC", "0")


def replaceable() -> bool:
    """Whether this Ray has the internals LeanTorchTrainer changes (controller_parts' are None without theirs)."""
    return (DatasetsCallback is not None and NoAutoscalerScalingPolicy is not None
            and InheritedEnvTrainController is not None
            and get_env_vars_to_propagate is not None
            and callable(getattr(TorchTrainer, "_create_default_callbacks", None))
            and callable(getattr(TorchTrainer, "_initialize_and_run_controller", None)))


class LeanTorchTrainer(TorchTrainer):
    """A TorchTrainer whose controller imports no torch (`WorkerProcessGroupConfig` unless a `torch_config` is given),
    without the DatasetManager actor when it is given no datasets; given `record_file` (from `cleaned_after_the_fit`),
    without the PlacementGroupCleaner actor; with `asks_autoscaler=False` (a cluster without an autoscaler), without
    resource requests and the AutoscalingCoordinator actor they start; given `controller_hosts`, its controller runs
    in a process of that pool instead of a new one. Where this Ray lacks the internals (`replaceable()` is false)
    it is Ray's TorchTrainer unchanged."""

    def __init__(self, *args, record_file: str | None = None, asks_autoscaler: bool = True,
                 controller_hosts: "ControllerHosts | None" = None, **kwargs):
        self._record_file, self._asks_autoscaler = record_file, asks_autoscaler
        self._controller_hosts = controller_hosts
        if replaceable():
            kwargs.setdefault("torch_config", WorkerProcessGroupConfig())
        super().__init__(*args, **kwargs)

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if not replaceable():
            return callbacks
        if not self.datasets:
            callbacks = [c for c in callbacks if not isinstance(c, DatasetsCallback)]
        if self._record_file:
            callbacks = [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]
            callbacks.append(RecordPlacementGroups(self._record_file))
        return callbacks

    def _initialize_and_run_controller(self, **controller_kwargs):
        # Ray Train passes the scaling policy it made (`create_scaling_policy`) here, on its way to the controller
        if (not self._asks_autoscaler and replaceable()
                and type(controller_kwargs.get("scaling_policy")) is FixedScalingPolicy):
            controller_kwargs["scaling_policy"] = NoAutoscalerScalingPolicy(scaling_config=self.scaling_config)
        if self._controller_hosts is None or not replaceable():
            return super()._initialize_and_run_controller(**controller_kwargs)
        return self._controller_hosts.run(controller_kwargs, self._register_sigint_handler)


# How long a kept controller process may take to answer before a new one is started in its place.
HOST_READY_TIMEOUT_S = 30.0


# What Ray Train gives its controller's environment (as a runtime_env) unless the user set it: no warning for the
# blocking calls the controller makes in its event loop by design.
BLOCKING_GET_WARNING_VARIABLE = RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
BLOCKING_GET_WARNING_DEFAULT = DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE


class ControllerHosts:
    """The idle `ControllerHost` actors of this driver, by cluster, node and the environment Ray Train gives a
    controller (`get_env_vars_to_propagate`, read per fit: a host only runs fits whose controller would have had its
    environment). A fit takes an idle host or starts one (as Ray starts a controller: no CPUs, on the driver's node)
    and gives it back when it returns; a host whose fit raised (its process died, or the fit was aborted) is not kept.
    Hosts are not detached: they end with the driver.

    A variable every process of the cluster already has (`cluster_environment`: an embedded cluster's, inherited
    from its raylet) is not given again as a runtime_env: a host without one starts as a plain Ray worker process,
    and so do the processes its controller starts (they inherit the host's runtime_env;
    controller_parts.InheritedEnvWorkerGroup leaves out what the workers inherit anyway)."""

    def __init__(self):
        self._idle: dict[tuple, list] = {}
        self._cluster_env: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()

    def cluster_environment(self, gcs_address: str, env: dict[str, str]) -> None:
        """Every process of the cluster at `gcs_address` has these variables (its raylet's environment)."""
        self._cluster_env[gcs_address] = dict(env)

    def run(self, controller_kwargs: dict, register_sigint_handler):
        env_vars = get_env_vars_to_propagate()
        env_vars.setdefault(BLOCKING_GET_WARNING_VARIABLE, BLOCKING_GET_WARNING_DEFAULT)  # as Ray's controller
        key, host = self._take(env_vars)
        if threading.current_thread() is threading.main_thread():
            register_sigint_handler(host)  # Ctrl-C aborts the fit through the host, as through Ray's controller
        try:
            result = ray.get(host.run.remote(controller_kwargs))
        except BaseException:
            ray.kill(host)  # best effort: it may be gone already; never handed to another fit
            raise
        with self._lock:
            self._idle.setdefault(key, []).append(host)
        return result

    def _take(self, env_vars: dict[str, str]):
        context = ray.get_runtime_context()
        node_id, cluster = context.get_node_id(), context.gcs_address
        inherited = self._cluster_env.get(cluster, {})
        env_vars = {k: v for k, v in env_vars.items() if inherited.get(k) != v}
        key = (cluster, context.get_job_id(), node_id, tuple(sorted(env_vars.items())))
        while True:
            with self._lock:
                idle = self._idle.get(key, [])
                host = idle.pop() if idle else None
            if host is None:
                host = ray.remote(num_cpus=0, label_selector={ray._raylet.RAY_NODE_ID_KEY: node_id},
                                  runtime_env={"env_vars": env_vars} if env_vars else None)(ControllerHost).remote()
                return key, host
            try:
                ray.get(host.ready.remote(), timeout=HOST_READY_TIMEOUT_S)
                return key, host
            except (RayActorError, GetTimeoutError) as e:
                say(f"a kept Train controller process did not answer in {HOST_READY_TIMEOUT_S:.0f} s "
                    f"({type(e).__name__}); starting a new one")
                ray.kill(host)


CONTROLLER_HOSTS = ControllerHosts()  # this driver's: fits of every thread share it


def fit(train_fn, embedded_cluster: bool, started_it: bool | None = None, **trainer_kwargs):
    """`LeanTorchTrainer(train_fn, **trainer_kwargs).fit()`. On an `embedded_cluster` (one driver's local cluster: no
    autoscaler) no resource requests are sent, and no PlacementGroupCleaner process is started: the calling process
    removes what the run's controller left behind once the fit returns or raises (`cleaned_after_the_fit`), and the
    cluster's driver removes what a calling process that died left (`remove_groups_of_dead_processes`, after each Tune
    trial). Where this process `started_it` (default: `embedded_cluster`), the run's controller also runs in a process
    this one keeps for its next fit; a process inside the cluster (a Tune trial) gets a controller process per fit,
    since it can die on its own."""
    started_it = embedded_cluster if started_it is None else started_it
    with cleaned_after_the_fit() if embedded_cluster else nullcontext() as record_file:
        return LeanTorchTrainer(train_fn, record_file=record_file, asks_autoscaler=not embedded_cluster,
                                controller_hosts=CONTROLLER_HOSTS if started_it else None, **trainer_kwargs).fit()


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
    # (a private attribute: Ray has no public call for the session folder)
    folder = Path(ray._private.worker._global_node.get_session_dir_path()) / "forgetless-placement-groups"
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
