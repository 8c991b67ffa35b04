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

import asyncio

from forgetless._compat.ray_train import (  # noqa: F401 - the pieces the controller unpickles, by their old names
    InheritedEnvTrainController, NoAutoscalerScalingPolicy, RecordPlacementGroups, WorkerProcessGroupConfig)


class FitAborted(RuntimeError):
    """The fit a `ControllerHost` ran was aborted (`abort_fit`): its workers and placement group are gone, the host
    process runs the next fit."""


class ControllerHost:
    """An asyncio actor that runs Train controllers, one at a time, in a process that outlives them (lean_trainer's
    `ControllerHosts` hands it one fit after another, and a Tune search's driver lends one to each trial slot:
    tuning/trial.py). A `TrainController` is otherwise an actor of its own per fit, whose process start and imports
    come before any worker starts. The methods the driver and the workers call on the controller actor (`run`,
    `get_result`, `abort`, `get_all_reported_checkpoints`) are here, passed on to the controller of the fit now
    running; `abort_fit` aborts that fit and keeps the process."""

    def __init__(self):
        self._controller = None
        self._owner: str | None = None  # who asked for the fit now running (a trial's id), if they said
        self._task: asyncio.Task | None = None
        self._ended = asyncio.Event()  # set once run() has returned or raised (and the host is idle again)

    async def ready(self) -> bool:
        return True

    async def idle(self) -> bool:
        return self._controller is None

    async def run(self, controller_kwargs: dict, owner: str | None = None):
        if self._controller is not None:  # the pool never hands a busy host out: a second fit here is a bug
            raise RuntimeError("this Train controller host is already running a fit")
        self._controller, self._owner = InheritedEnvTrainController(**controller_kwargs), owner
        self._ended = ended = asyncio.Event()
        self._task = asyncio.ensure_future(self._controller.run())
        try:
            try:
                await self._task
            except asyncio.CancelledError:  # abort_fit cancelled the controller's loop
                raise FitAborted(f"the Train run was aborted{f' (the fit of {owner})' if owner else ''}") from None
            return self._controller.get_result()
        finally:
            self._controller = self._owner = self._task = None
            ended.set()

    async def abort(self) -> None:
        # Ray's abort ends the actor's process (ray.actor.exit_actor): the host goes with the fit, as a controller
        # actor would; the pool then starts a new host for the next fit (Ctrl-C of a driver's fit)
        if self._controller is not None:
            await self._controller.abort()

    async def abort_fit(self, owner: str | None = None) -> bool:
        """Abort the fit now running (given `owner`: only if it is that caller's), as Ray's abort does (the workers
        shut down, their placement group removed, the run marked aborted), and keep this process for the next fit:
        `run` raises FitAborted. False where there was no such fit. The controller's loop is cancelled first, so no
        iteration of it acts on the aborted worker group (in Ray's abort the process exits instead)."""
        if self._controller is None or (owner is not None and owner != self._owner):
            return False
        task, ended = self._task, self._ended
        task.cancel()  # takes effect at the loop's next await: none comes before the abort below is done
        self._controller.abort_in_place()
        await ended.wait()  # run() has raised FitAborted: the host is idle before the caller hands it on
        return True

    async def get_all_reported_checkpoints(self, *args, **kwargs):
        # a worker's `ray.train.get_all_reported_checkpoints()` (forgetless waits on its checkpoint's commit with it)
        if self._controller is None:
            raise RuntimeError("no fit is running in this Train controller host")
        return await self._controller.get_all_reported_checkpoints(*args, **kwargs)
