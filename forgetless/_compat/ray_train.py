"""Ray Train V2 internals forgetless's Train controller uses, and their public path. Written and tested for Ray 2.60
(Train V2, range below). Nothing here imports torch: the Train controller unpickles these classes (see
platform/driver/train_controller.py); the driver-side trainer is in _compat/ray_trainer.py.

- `RecordPlacementGroups` (a `WorkerGroupCallback`): records each run's placement group so that the calling process
  removes what a dead controller left, instead of Ray's PlacementGroupCleaner actor per fit.
- `NoAutoscalerScalingPolicy` (Ray's `FixedScalingPolicy` minus its `_maybe_send_resource_request`): no
  AutoscalingCoordinator actor on an embedded cluster.
- `CheckpointBoundaryElasticPolicy` (Ray's `ElasticScalingPolicy`, its running-group decision replaced): an elastic
  run grows only right after a complete checkpoint. (It counts room through Ray's AutoscalingCoordinator actor, on an
  embedded cluster too.) Public path: Ray's elastic policy, which grows whenever it sees room.
- `InheritedEnvTrainController` / `InheritedEnvWorkerGroup` (overriding `WorkerGroup._get_worker_runtime_env`): workers
  without a runtime_env of their own, started from Ray's idle worker pool; `abort_in_place`, Ray's controller abort
  without its process exit (a Tune trial's fit aborted in the controller host its search's driver keeps).
- the worker-side steps of Ray's TorchConfig (`ray.train.torch.config._setup_torch_process_group` and its siblings,
  `ray.train._internal.utils.get_address_and_port`), so that the controller imports no torch.
- `controller_env_vars` (`get_env_vars_to_propagate`), `report_logger_name` (the module Ray Train names its
  per-report logger after) and `train_error_logger_name` (the logger of a failed training function's traceback).

Public path (another Ray, or FORGETLESS_PUBLIC_PATHS=1): Ray's TorchTrainer and TorchConfig unchanged. Each fit then
starts a DatasetManager, a PlacementGroupCleaner and (first fit) an AutoscalingCoordinator actor, and a Train
controller process of its own that imports torch: ~5-10 s more per fit on 2 cores (benchmarks/train_floor.py).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError
from ray.train.backend import Backend, BackendConfig

from forgetless._compat import Seam

logger = logging.getLogger(__name__)

LOW, BELOW = "2.60", "2.61"  # written and tested with 2.60.0 (Train V2)

try:  # importing a seam never raises: a name that moved means the public path
    from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR as BLOCKING_GET_WARNING_VARIABLE
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.constants import (
        DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE as BLOCKING_GET_WARNING_DEFAULT)
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE, get_env_vars_to_propagate
    from ray.train.v2._internal.execution import context as _train_context
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    from ray.train.v2._internal.execution.controller import TrainController
    from ray.train.v2._internal.execution.controller.state import AbortedState
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
    from ray.train.v2._internal.execution.scaling_policy import NoopDecision
    from ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client import (
        AUTOSCALING_REQUESTS_GET_TIMEOUT_S)
    from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy
    from ray.train.v2._internal.execution.worker_group import WorkerGroup
    from ray.train.v2._internal.util import TrainingFramework
    _FOUND = True
except Exception:  # noqa: BLE001 - another Ray: ImportError, or an error of a module that changed
    _FOUND = False
    BLOCKING_GET_WARNING_VARIABLE, BLOCKING_GET_WARNING_DEFAULT = "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC", "0"

SHUTDOWN_TIMEOUT_ENV = "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S"  # Ray's own variable for the same wait
DEFAULT_SHUTDOWN_TIMEOUT_S = 30

SEAM = Seam("Ray Train", "ray", LOW, BELOW, probe=lambda: _FOUND,
            slower="every fit starts Ray Train's DatasetManager, PlacementGroupCleaner and AutoscalingCoordinator "
                   "actors and a Train controller process that imports torch: ~5-10 s more per fit")


def controller_env_vars() -> dict[str, str]:
    """The environment Ray Train gives a Train controller (as a runtime_env), as its own controller start does."""
    env_vars = get_env_vars_to_propagate()
    env_vars.setdefault(BLOCKING_GET_WARNING_VARIABLE, BLOCKING_GET_WARNING_DEFAULT)
    return env_vars


def report_logger_name() -> str | None:
    """The logger of Ray Train's per-report line ("Reporting training result N"): named after its source file, not
    "ray.train" (so LoggingConfig's level does not reach it). None where the seam is off (the line stays)."""
    return _train_context.__file__ if SEAM.active() else None


def train_error_logger_name() -> str | None:
    """The logger of Ray Train's "Error in training function:" record (the traceback of a failed training function,
    from every rank; ray/train/v2/_internal/util.py names it after its module). None where the seam is off (the record
    stays on the console)."""
    return "ray.train.v2._internal.util" if SEAM.active() else None


def torch_framework():
    """Ray Train's tag for a torch backend config (None where the seam is off)."""
    return TrainingFramework.TORCH if _FOUND else None


# --- the worker-side steps of Ray's TorchConfig (run on the workers, where torch is imported anyway) ---------------

def worker_address_and_port() -> tuple[str, int]:
    from ray.train._internal.utils import get_address_and_port

    return get_address_and_port()


def worker_set_environment(addr: str, port: int) -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    _set_torch_distributed_env_vars()  # RANK, WORLD_SIZE, LOCAL_RANK, ... as torchrun sets them


def worker_init_process_group(backend: str, world_rank: int, world_size: int, timeout_s: int) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(backend=backend, world_rank=world_rank, world_size=world_size, init_method="env://",
                               timeout_s=timeout_s)


def worker_shutdown(destroy_process_group: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)


# --- Ray's TorchConfig without torch in the controller ----------------------------------------------------------------------------------------

class WorkerProcessGroupBackend(Backend):
    share_cuda_visible_devices: bool = True  # as Ray's torch backend: GPU workers of a node see each other's GPUs

    def on_start(self, worker_group, backend_config: "WorkerProcessGroupConfig") -> None:
        backend = backend_config.backend or ("nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0
                                             else "gloo")
        addr, port = worker_group.execute_single(0, worker_address_and_port)
        worker_group.execute(worker_set_environment, addr=addr, port=port)
        ray.get([worker_group.execute_single_async(rank, worker_init_process_group, backend=backend,
                                                   world_rank=rank, world_size=len(worker_group),
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config: "WorkerProcessGroupConfig") -> None:
        timeout_s = int(os.environ.get(SHUTDOWN_TIMEOUT_ENV, DEFAULT_SHUTDOWN_TIMEOUT_S))
        futures = worker_group.execute_async(worker_shutdown, destroy_process_group=len(worker_group) > 1)
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            logger.warning("torch process group shutdown timed out after %s s", timeout_s)


@dataclass
class WorkerProcessGroupConfig(BackendConfig):
    """Ray's TorchConfig (backend None: gloo, or nccl with GPUs; init by env://), without torch in the controller."""

    backend: str | None = None
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return WorkerProcessGroupBackend

    @property
    def train_func_context(self):
        # used where the train function is built (the driver) and run (the workers): both have torch
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager

    @property
    def framework(self):
        return torch_framework()

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


# --- run in the Train controller ------------------------------------------------------------------------------------

if _FOUND:
    class RecordPlacementGroups(WorkerGroupCallback):
        """Runs in the Train controller: appends the id of every placement group a worker group starts with to a file
        on the controller's (= the driver's) machine. A restarted worker group gets a new group: one line each."""

        def __init__(self, record_file: str):
            self.record_file = record_file

        def after_worker_group_start(self, worker_group) -> None:
            try:
                group = worker_group.get_worker_group_state().placement_group_handle.placement_group
                with open(self.record_file, "a") as f:
                    f.write(group.id.hex() + "\n")
            except Exception as e:  # recording is best effort: the run itself must not fail for it
                logger.warning("forgetless could not record the run's placement group (%s); if the Train controller "
                               "dies the group may keep its CPUs until the driver exits", e)

    class NoAutoscalerScalingPolicy(FixedScalingPolicy):
        """Ray's fixed-size policy (the same decisions) that asks no cluster autoscaler for resources."""

        def after_controller_start(self, train_run_context) -> None:
            pass  # Ray's sends the first request here (and creates the AutoscalingCoordinator actor)

        def _maybe_send_resource_request(self) -> None:
            pass  # Ray's re-sends the request every 20 s while the run waits or runs

    class CheckpointBoundaryElasticPolicy(ElasticScalingPolicy):
        """Ray's elastic policy (start with what fits, restart on fewer after a lost worker, within min..max), whose
        running worker group grows only at a checkpoint boundary: right after a checkpoint a worker reported is
        complete (its `marker_file`, written last, is there), so a grow loses no training but the moment between
        that file and the controller's next poll. Ray's own policy restarts a running group whenever it sees room,
        which throws away the work since the last checkpoint. A checkpoint named in `never_after` (the run's final
        one) is no boundary: the run is over."""

        def __init__(self, scaling_config, marker_file: str, never_after: tuple[str, ...] = ()):
            super().__init__(scaling_config)
            self._marker_file, self._never_after = marker_file, never_after
            self._boundary = None  # the latest reported checkpoint not yet looked at

        def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status):
            self._maybe_send_resource_request()
            for status in worker_group_status.worker_statuses.values():
                report = status.training_report
                if report is not None and report.checkpoint is not None:
                    self._boundary = report.checkpoint
            if self._boundary is None or not self._complete(self._boundary):
                return NoopDecision()
            checkpoint, self._boundary = self._boundary, None
            if os.path.basename(checkpoint.path.rstrip("/")) in self._never_after:
                return NoopDecision()
            if worker_group_state.num_workers >= self.scaling_config.max_workers:
                return NoopDecision()
            reserved = self._get_reserved_resources()
            if reserved is None:
                return NoopDecision()
            room = self._count_possible_workers(reserved)
            if room <= worker_group_state.num_workers:
                return NoopDecision()
            logger.warning("forgetless: room for %d workers (running %d): growing the worker group at checkpoint %s",
                           room, worker_group_state.num_workers, os.path.basename(checkpoint.path.rstrip("/")))
            return self._get_resize_decision(room)

        def _get_reserved_resources(self):
            """Ray's, from a fresh view of the cluster's nodes (its coordinator refreshes its view every 20 s: a
            restart after a lost node would first try the node's room, and wait for it up to the worker group's start
            timeout, 60 s; a returned node would wait a tick to be seen). At most once a second, as Ray's."""
            now = time.monotonic()
            if now - self._latest_reserved_resources_query_time < self.GET_RESERVED_RESOURCES_INTERVAL_S:
                return self._latest_reserved_resources
            try:
                self._latest_reserved_resources = ray.get(
                    self._autoscaling_coordinator.get_reserved_resources.remote(self._requester_id, recompute=True),
                    timeout=AUTOSCALING_REQUESTS_GET_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - no answer: decide nothing now, ask again at the next poll
                logger.warning("forgetless: the AutoscalingCoordinator did not answer (%s); no resize now", e)
                self._latest_reserved_resources = None
            self._latest_reserved_resources_query_time = time.monotonic()
            return self._latest_reserved_resources

        def _complete(self, checkpoint) -> bool:
            from pyarrow.fs import FileType

            try:
                info = checkpoint.filesystem.get_file_info(f"{checkpoint.path.rstrip('/')}/{self._marker_file}")
            except Exception:  # noqa: BLE001 - storage hiccup: look again at the next poll
                return False
            return info.type != FileType.NotFound

    class InheritedEnvWorkerGroup(WorkerGroup):
        """Ray's worker group, whose workers are not given again (as runtime_env variables) the Ray Train variables
        this controller's process has with the same value: the workers inherit them, from the raylet or from this
        process's runtime_env. A worker without a runtime_env of its own starts as a plain Ray worker process, not
        through Ray's setup_worker.py (one more Python start and `import ray` each)."""

        @staticmethod
        def _get_worker_runtime_env(custom_runtime_env):
            runtime_env = WorkerGroup._get_worker_runtime_env(custom_runtime_env)
            runtime_env["env_vars"] = {k: v for k, v in runtime_env["env_vars"].items()
                                       if not (k in ENV_VARS_TO_PROPAGATE and os.environ.get(k) == v)}
            return runtime_env

    class InheritedEnvTrainController(TrainController):
        worker_group_cls = InheritedEnvWorkerGroup

        def abort_in_place(self) -> None:
            """Ray's `TrainController.abort` (its abort callbacks, the worker group aborted: workers shut down, their
            placement group removed; the run marked aborted) without its last step, `ray.actor.exit_actor()`: the
            process that runs this controller (a ControllerHost) runs the next fit. The caller stops the controller's
            loop first (it would otherwise act on the aborted worker group; in Ray's abort the process is gone)."""
            if self.get_state().is_terminal():
                return
            self._controller_callback_manager.invoke_best_effort("before_controller_abort")
            try:
                if self._worker_group:
                    self._worker_group.abort()
                self._set_state(AbortedState())
            except Exception as e:  # noqa: BLE001 - as Ray's abort: logged, the run ends aborted either way
                logger.exception("Error aborting worker group: %s", e)
else:  # another Ray: nothing of this is used (SEAM.active() is false)
    RecordPlacementGroups = NoAutoscalerScalingPolicy = InheritedEnvTrainController = None
    DatasetsCallback = PlacementGroupCleanerCallback = FixedScalingPolicy = None
    CheckpointBoundaryElasticPolicy = ElasticScalingPolicy = None


def is_fixed_scaling_policy(policy: Any) -> bool:
    """Whether `policy` is the scaling policy Ray Train makes for a fixed-size run."""
    return _FOUND and type(policy) is FixedScalingPolicy


def is_elastic_scaling_policy(policy: Any) -> bool:
    """Whether `policy` is the scaling policy Ray Train makes for an elastic run (num_workers=(min, max))."""
    return _FOUND and type(policy) is ElasticScalingPolicy
