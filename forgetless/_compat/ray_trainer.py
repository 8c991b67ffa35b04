"""The driver side of the Ray Train V2 seam (written and tested for Ray 2.60, the range of _compat/ray_train.py):
`LeanTorchTrainer`, Ray's TorchTrainer with two of its private methods overridden (`_create_default_callbacks`,
`_initialize_and_run_controller`, and `_register_sigint_handler` called). What it leaves out and why:
platform/driver/trainer.py. Where the seam is off (another Ray, FORGETLESS_PUBLIC_PATHS=1) it is Ray's TorchTrainer
unchanged (the public path's cost: _compat/ray_train.py).
"""
from __future__ import annotations

from ray.train.torch import TorchTrainer

from forgetless._compat import ray_train


def replaceable() -> bool:
    """Whether LeanTorchTrainer changes anything: this Ray has the internals it uses, and the seam is on."""
    return (ray_train.SEAM.active()
            and callable(getattr(TorchTrainer, "_create_default_callbacks", None))
            and callable(getattr(TorchTrainer, "_initialize_and_run_controller", None))
            and callable(getattr(TorchTrainer, "_register_sigint_handler", None)))


class LeanTorchTrainer(TorchTrainer):
    """A TorchTrainer whose controller imports no torch (`WorkerProcessGroupConfig` unless a `torch_config` is given),
    without the DatasetManager actor when it is given no datasets; given `record_file`, without the
    PlacementGroupCleaner actor (the run's placement group is recorded there instead); with `asks_autoscaler=False`
    (a cluster without an autoscaler), without resource requests and the AutoscalingCoordinator actor they start;
    given `controller_hosts` (an object with `run(controller_kwargs, register_sigint_handler)`), its controller runs
    there instead of in a new process; given `grow_marker` (the file a checkpoint gets last), an elastic run grows
    only right after a complete checkpoint (not `final_checkpoint`). Where `replaceable()` is false it is Ray's
    TorchTrainer unchanged."""

    def __init__(self, *args, record_file: str | None = None, asks_autoscaler: bool = True,
                 controller_hosts=None, grow_marker: str | None = None, final_checkpoint: str | None = None,
                 **kwargs):
        self._record_file, self._asks_autoscaler = record_file, asks_autoscaler
        self._grow_marker, self._final_checkpoint = grow_marker, final_checkpoint
        self._controller_hosts = controller_hosts
        self._lean = replaceable()
        if self._lean:  # the controller imports no torch (unless a torch_config is given)
            kwargs.setdefault("torch_config", ray_train.WorkerProcessGroupConfig())
        super().__init__(*args, **kwargs)

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if not self._lean:
            return callbacks
        if not self.datasets:
            callbacks = [c for c in callbacks if not isinstance(c, ray_train.DatasetsCallback)]
        if self._record_file:
            callbacks = [c for c in callbacks if not isinstance(c, ray_train.PlacementGroupCleanerCallback)]
            callbacks.append(ray_train.RecordPlacementGroups(self._record_file))
        return callbacks

    def _initialize_and_run_controller(self, **controller_kwargs):
        # Ray Train passes the scaling policy it made (`create_scaling_policy`) here, on its way to the controller
        if (self._lean and not self._asks_autoscaler
                and ray_train.is_fixed_scaling_policy(controller_kwargs.get("scaling_policy"))):
            controller_kwargs["scaling_policy"] = ray_train.NoAutoscalerScalingPolicy(
                scaling_config=self.scaling_config)
        if self._lean and self._grow_marker and ray_train.is_elastic_scaling_policy(
                controller_kwargs.get("scaling_policy")):
            controller_kwargs["scaling_policy"] = ray_train.CheckpointBoundaryElasticPolicy(
                self.scaling_config, self._grow_marker, (self._final_checkpoint,) if self._final_checkpoint else ())
        if self._controller_hosts is None or not self._lean:
            return super()._initialize_and_run_controller(**controller_kwargs)
        return self._controller_hosts.run(controller_kwargs, self._register_sigint_handler)
