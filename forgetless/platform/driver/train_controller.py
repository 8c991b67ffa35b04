"""What the Ray Train controller of a forgetless run unpickles and runs: nothing here may import torch.

The Train controller is a process of its own per fit. It unpickles the trainer's backend config and callbacks, and so
imports their modules. Ray's `TorchConfig` lives in `ray.train.torch.config`, which imports torch at its top: the
controller spends ~2-5 s on a 2-core machine importing torch (and forgetless's modules, which import torch through the
package) before it can start a single worker, and it never runs torch itself. So what forgetless hands the
controller imports no torch: `WorkerProcessGroupConfig`, `RecordPlacementGroups` and `NoAutoscalerScalingPolicy` (Ray
Train internals: the seam _compat/ray_train.py) and, here, `ControllerHost`, an actor that runs the Train controllers
of one driver's fits one after another in one process (see platform/driver/trainer.py).

- `WorkerProcessGroupConfig`: Ray's TorchConfig set-up (gloo on CPUs, nccl on GPUs; MASTER_ADDR/MASTER_PORT and the
  torchrun variables on each worker; `torch.distributed.init_process_group` on every rank; destroyed at the end),
  with the controller's part written in the seam and each worker's part done by Ray's own functions.
- `NoAutoscalerScalingPolicy`: Ray's fixed-size scaling policy without its requests to the cluster autoscaler, for an
  embedded cluster (which has none). Ray Train sends each fit's request to an `AutoscalingCoordinator` actor, a
  process of Ray Data's that the cluster's first fit starts and its controller waits on (up to 5 s) before it starts
  any worker: 1-4 s of the first run of every invocation on 2 cores, and a process of ~200 MB kept for nothing.

`tests/test_lean_trainer.py` checks a live fit: its controller has no torch library loaded, its workers do.
"""
from __future__ import annotations

from forgetless._compat.ray_train import (  # noqa: F401 - the pieces the controller unpickles, by their old names
    InheritedEnvTrainController, NoAutoscalerScalingPolicy, RecordPlacementGroups, WorkerProcessGroupConfig)


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
