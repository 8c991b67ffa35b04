"""What the Ray Train controller of a forgetless run unpickles and runs: nothing here may import torch.

The Train controller is a process of its own per fit. It unpickles the trainer's backend config and callbacks, and so
imports their modules. Ray's `TorchConfig` lives in `ray.train.torch.config`, which imports torch at its top: the
controller spends ~2-5 s on a 2-core machine importing torch (and forgetless's modules, which import torch through the
package) before it can start a single worker, and it never runs torch itself. So the two pieces forgetless hands the
controller live here, and their worker-side steps import Ray's torch functions on the workers only:

- `WorkerProcessGroupConfig`: Ray's TorchConfig set-up (gloo on CPUs, nccl on GPUs; MASTER_ADDR/MASTER_PORT and the
  torchrun variables on each worker; `torch.distributed.init_process_group` on every rank; destroyed at the end),
  with the controller's part written here and each worker's part done by Ray's own functions.
- `RecordPlacementGroups`: see platform/driver/trainer.py.
- `ControllerHost`: an actor that runs the Train controllers of one driver's fits one after another in one process
  (see platform/driver/trainer.py).
- `NoAutoscalerScalingPolicy`: Ray's fixed-size scaling policy without its requests to the cluster autoscaler, for an
  embedded cluster (which has none). Ray Train sends each fit's request to an `AutoscalingCoordinator` actor, a
  process of Ray Data's that the cluster's first fit starts and its controller waits on (up to 5 s) before it starts
  any worker: 1-4 s of the first run of every invocation on 2 cores, and a process of ~200 MB kept for nothing.

`tests/test_lean_trainer.py` checks a live fit: its controller has no torch library loaded, its workers do.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError
from ray.train.backend import Backend, BackendConfig

logger = logging.getLogger(__name__)

try:  # Ray Train V2 internals (ray 2.60); platform/driver/trainer.py falls back to Ray's own parts without them
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE
    from ray.train.v2._internal.execution.controller import TrainController
    from ray.train.v2._internal.execution.worker_group import WorkerGroup
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
    from ray.train.v2._internal.util import TrainingFramework
except ImportError:  # pragma: no cover - another Ray version
    WorkerGroupCallback = FixedScalingPolicy = TrainingFramework = TrainController = WorkerGroup = None

SHUTDOWN_TIMEOUT_ENV = "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S"  # Ray's own variable for the same wait
DEFAULT_SHUTDOWN_TIMEOUT_S = 30


# --- run on the workers (torch is imported there, where it is needed anyway) --------------------------------------

def _worker_address_and_port() -> tuple[str, int]:
    from ray.train._internal.utils import get_address_and_port

    return get_address_and_port()


def _worker_set_environment(addr: str, port: int) -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    _set_torch_distributed_env_vars()  # RANK, WORLD_SIZE, LOCAL_RANK, ... as torchrun sets them


def _worker_init_process_group(backend: str, world_rank: int, world_size: int, timeout_s: int) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(backend=backend, world_rank=world_rank, world_size=world_size, init_method="env://",
                               timeout_s=timeout_s)


def _worker_shutdown(destroy_process_group: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)


# --- run in the controller ----------------------------------------------------------------------------------------

class WorkerProcessGroupBackend(Backend):
    share_cuda_visible_devices: bool = True  # as Ray's torch backend: GPU workers of a node see each other's GPUs

    def on_start(self, worker_group, backend_config: "WorkerProcessGroupConfig") -> None:
        backend = backend_config.backend or ("nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0
                                             else "gloo")
        addr, port = worker_group.execute_single(0, _worker_address_and_port)
        worker_group.execute(_worker_set_environment, addr=addr, port=port)
        ray.get([worker_group.execute_single_async(rank, _worker_init_process_group, backend=backend,
                                                   world_rank=rank, world_size=len(worker_group),
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config: "WorkerProcessGroupConfig") -> None:
        timeout_s = int(os.environ.get(SHUTDOWN_TIMEOUT_ENV, DEFAULT_SHUTDOWN_TIMEOUT_S))
        futures = worker_group.execute_async(_worker_shutdown, destroy_process_group=len(worker_group) > 1)
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
        return TrainingFramework.TORCH if TrainingFramework is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


if WorkerGroupCallback is not None:
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
else:  # pragma: no cover - another Ray version
    RecordPlacementGroups = None


if FixedScalingPolicy is not None:
    class NoAutoscalerScalingPolicy(FixedScalingPolicy):
        """Ray's fixed-size policy (the same decisions) that asks no cluster autoscaler for resources."""

        def after_controller_start(self, train_run_context) -> None:
            pass  # Ray's sends the first request here (and creates the AutoscalingCoordinator actor)

        def _maybe_send_resource_request(self) -> None:
            pass  # Ray's re-sends the request every 20 s while the run waits or runs
else:  # pragma: no cover - another Ray version
    NoAutoscalerScalingPolicy = None


if TrainController is not None:
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
else:  # pragma: no cover - another Ray version
    InheritedEnvTrainController = None


class ControllerHost:
    """An asyncio actor that runs Train controllers, one at a time, in a process that outlives them (lean_trainer's
    `ControllerHosts` hands it one fit after another). A `TrainController` is otherwise an actor of its own per fit,
    whose process start and imports come before any worker starts. The methods the driver and the workers call on the
    controller actor (`run`, `get_result`, `abort`, `get_all_reported_checkpoints`) are here, passed on to the
    controller of the fit now running."""

    def __init__(self):
        self._controller = None

    async def ready(self) -> bool:
        return True

    async def run(self, controller_kwargs: dict):
        if self._controller is not None:  # the pool never hands a busy host out: a second fit here is a bug
            raise RuntimeError("this Train controller host is already running a fit")
        self._controller = InheritedEnvTrainController(**controller_kwargs)
        try:
            await self._controller.run()
            return self._controller.get_result()
        finally:
            self._controller = None

    async def abort(self) -> None:
        # Ray's abort ends the actor's process (ray.actor.exit_actor): the host goes with the fit, as a controller
        # actor would; the pool then starts a new host for the next fit
        if self._controller is not None:
            await self._controller.abort()

    async def get_all_reported_checkpoints(self, *args, **kwargs):
        # a worker's `ray.train.get_all_reported_checkpoints()` (forgetless waits on its checkpoint's commit with it)
        if self._controller is None:
            raise RuntimeError("no fit is running in this Train controller host")
        return await self._controller.get_all_reported_checkpoints(*args, **kwargs)
