"""The typed boundary between the driver and the Ray Train workers.

`WorkerJob` is everything a worker is told (the runner builds it, `train_worker` reads it); `RunState` is everything a
run checkpoints and resumes from (its JSON is `state.json` in every checkpoint, which the driver reads back).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from forgetless.config import ExperimentConfig, OptimConfig, StrategyConfig
from forgetless.platform.tracking.mlflow_runs import TrackingTarget


@dataclass(frozen=True)
class StopPointRef:
    """A stop point of the pre-training trajectory: its epoch and its consolidated model file."""

    epoch: int
    uri: str


@dataclass(frozen=True)
class CheckpointPolicy:
    """When a run writes a checkpoint during its phases, and how that checkpoint is named.

    `name_format` takes `stage`, `phase` and `epoch`. A checkpoint is written every `every_epochs` epochs and at the end
    of every phase; `at_start` adds one of the untrained model (θ⁰, the first stop point of a trajectory);
    `stage_end_format` (taking `stage`) names the checkpoint written once a task and its accuracy-matrix row are done.
    """

    name_format: str
    every_epochs: int = 1
    at_start: bool = False
    stage_end_format: str | None = None
    # Every checkpoint carries the consolidated model.pt even when the weights are kept as ZeRO-3 partitions (the
    # stop points of a pre-training trajectory: later runs load them).
    exports_model: bool = False

    def name(self, stage: int, phase: int, epoch: int) -> str:
        return self.name_format.format(stage=stage, phase=phase, epoch=epoch)

    def due(self, epoch: int, phase_done: bool) -> bool:
        return phase_done or epoch % self.every_epochs == 0


@dataclass
class WorkerJob:
    """One Ray Train run: which tasks of the stream it trains, under which strategy, and where it reports."""

    config: ExperimentConfig
    run_name: str  # the Ray Train run name; also the key that finds its MLflow run again on resume
    display_name: str
    mode: str  # "pretrain" | "transfer": the `forgetless.mode` tag of the MLflow run (never branched on)
    strategy: StrategyConfig
    optim: OptimConfig  # optimizer, learning rate, batch size and epochs of every phase
    num_tasks: int  # the first num_tasks tasks of the stream are built and evaluated (1: the source only)
    stages: list[int]  # the tasks trained, in order (0 = the source)
    class_incremental: bool
    checkpoints: CheckpointPolicy
    tracking: TrackingTarget
    init_weights: str | None = None  # a state dict (path or s3://) loaded into the fresh model before training
    trajectory: list[StopPointRef] = field(default_factory=list)  # for strategies that need the stop points
    submitted_at: float | None = None  # the driver's wall clock as it submits the run (timing.PARTS start_workers)
    tasks: Any = None  # the driver's built stream in Ray's object store (shared_tasks); None: the worker builds it
    # optimizer steps per trained task, summed over the strategy's phases (TrainConfig.step_budget); None: no budget
    step_budget: int | None = None

    @property
    def use_gpu(self) -> bool:
        return self.config.scaling.use_gpu


@dataclass
class RunState:
    """What a run has done so far; checkpointed as state.json and restored on resume.

    `history` holds one record per evaluation: {step, stage, phase, epoch, acc: {task: acc}, loss: {task: loss},
    train_loss}; `R` the accuracy matrix rows measured so far (`L` the test losses of the same evaluations); `phase_log` one record per finished phase.
    """

    task_names: list[str]
    stage: int = 0
    phase: int = 0
    epoch: int = 0
    phase_step: int = 0
    phase_done: bool = False
    stage_done: bool = False
    finished: bool = False
    global_step: int = 0
    stage_step: int = 0  # optimizer steps of the current stage, over its phases (what a step budget counts)
    history: list[dict[str, Any]] = field(default_factory=list)
    R: list[list[float]] = field(default_factory=list)
    L: list[list[float]] = field(default_factory=list)  # test mean losses, row for row with R
    # the config's eval_tasks, row for row with R: {suite: {metric: value}} (worker/eval_tasks.py)
    eval_rows: list[dict[str, dict[str, float]]] = field(default_factory=list)
    mlflow_run_id: str | None = None
    train_seconds: float = 0.0
    trainable_params: dict[str, int] = field(default_factory=dict)
    phase_log: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: dict[str, int] | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # where the workers' time went (timing.PARTS)
    saved_at: float | None = None  # wall clock when this state was written into its checkpoint
    submitted_at: float | None = None  # WorkerJob.submitted_at of the invocation that wrote it
    # one record per change of the worker count (the first group's included): {step, workers, at (unix time)}; an
    # elastic run (scaling.num_workers: [MIN, MAX]) shrinks when a node is lost and grows when room returns
    workers: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> "RunState":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def enter_stage(self, stage: int) -> None:
        self.stage, self.phase, self.epoch, self.phase_step, self.stage_step = stage, 0, 0, 0, 0
        self.phase_done = self.stage_done = False

    def enter_phase(self, phase: int) -> None:
        self.phase, self.epoch, self.phase_step, self.phase_done = phase, 0, 0, False

    def position(self) -> dict[str, int]:
        return {"stage": self.stage, "phase": self.phase, "epoch": self.epoch, "global_step": self.global_step}
