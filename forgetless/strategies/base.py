"""The strategy contract. A strategy decides *what* trains and *how*; the platform decides where and how fast.

Strategies are plain PyTorch: they never import Ray, DeepSpeed or MLflow. The train loop asks a strategy for
- `build(model, tasks)`: structural surgery for the whole stream, on full weights, before any engine exists;
- `phases(model, stage, task)`: the phases of training one task, each with its parameter groups and learning rates;
- `extra_loss(...)`: terms added to the task's cross-entropy (L2-SP, EWC, LwF...);
- `after_task(...)`: what to keep once a task is done (Fisher information, frozen copies...).
Everything a strategy keeps must live in the model (modules/buffers), so checkpoints capture it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable, Iterator, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from forgetless.backbones.transfer_model import TransferModel, head_key
from forgetless.data.kinds import CLASSIFICATION, task_loss
from forgetless.data.tasks import TaskData


class StrategyParams(BaseModel):
    """Base of every strategy's knobs; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class TaskInfo:
    index: int  # 0 = source
    name: str
    num_classes: int
    classes: list[int]
    # Shape of one input (without the batch dimension), for strategies that build input-side modules.
    input_shape: tuple[int, ...] = ()
    kind: str = CLASSIFICATION  # what the task predicts, so how its loss is computed (data/kinds.py)

    @classmethod
    def of(cls, index: int, task: TaskData) -> "TaskInfo":
        """The description of a built task (no data): what strategies see."""
        return cls(index, task.name, task.num_classes, list(task.classes), tuple(task.input_shape), task.kind)


def task_infos(tasks: list[TaskData]) -> list[TaskInfo]:
    """The descriptions of a built stream, task 0 the source."""
    return [TaskInfo.of(i, t) for i, t in enumerate(tasks)]


@dataclass
class ParamGroup:
    name: str
    params: list[nn.Parameter]
    lr: float


@dataclass
class Phase:
    """A unit of training with fixed trainable parameters; the platform builds one DeepSpeed engine per phase."""

    name: str
    epochs: int
    param_groups: list[ParamGroup]
    # Modules kept in eval mode while training (a frozen backbone's BatchNorm statistics must not move).
    eval_modules: list[nn.Module] = field(default_factory=list)
    # Optional per-group learning-rate multiplier as a function of the phase's step (warm-up, decay).
    lr_multipliers: Callable[[int], list[float]] | None = None
    max_steps: int | None = None
    eval_every_steps: int | None = None
    # Called with this phase's validation losses (one per evaluation): True ends the phase early.
    stop_rule: Callable[[list[float]], bool] | None = None
    # Called on the unwrapped model after every optimizer step (e.g. to cap the size of an update).
    after_step: Callable[[nn.Module], None] | None = None
    before_step: Callable[[nn.Module], None] | None = None
    # Applied to each training batch's inputs (augmentation); None trains on clean data.
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None

    def trainable(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups for p in g.params]


@dataclass
class PrepareContext:
    """What the platform hands `Strategy.prepare`: plain data and callables, so a strategy stays free of Ray/DeepSpeed.

    Every rank gets one; callables that reduce across ranks (all_reduce_mean, source_accuracy) must be called by all.
    """

    rank: int
    world: int
    device: torch.device
    source_train: tuple[torch.Tensor, torch.Tensor]  # the whole source training split (x, y), on every rank
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor]  # in place, returns its argument
    source_accuracy: Callable[[nn.Module], float]  # validation accuracy on the source (sharded and reduced)
    log: Callable[[str], None]
    log_metrics: Callable[[dict[str, float], int], None]  # (metrics, step) to the run's tracking
    load_weights: Callable[[str], dict[str, torch.Tensor]]  # a state dict from a path or s3:// (weights only)
    pretrain: object  # the experiment's PretrainConfig (optimizer, lr, batch size, epochs of the source training)
    final_epoch: int  # the last epoch of the source pre-training
    # (epoch, consolidated state dict) of every pre-training stop point; only for strategies with needs_trajectory.
    trajectory: list[tuple[int, dict[str, torch.Tensor]]] | None = None


@dataclass
class TrainingData:
    """What a strategy that changes the data of a phase (`Strategy.train_batches`) sees of the stream: the training
    splits only, never a validation or test split; and who this rank is, so that it can take its own share."""

    splits: list[tuple[torch.Tensor, torch.Tensor]]  # (x_train, y_train) of every task of the stream, by task index
    rank: int
    world: int
    seed: int  # the experiment's seed
    epoch_seed: int  # the seed that orders this epoch's batches (derive_seed(seed, stage, phase, epoch))


class Strategy:
    name: ClassVar[str]
    paper: ClassVar[str] = "standard baseline"
    fidelity: ClassVar[Literal["confirmed", "interpretation"]] = "confirmed"
    Config: ClassVar[type[StrategyParams]] = StrategyParams
    # Does the strategy keep per-task parts that task-incremental evaluation can select by task id?
    has_per_task_parts: ClassVar[bool] = True
    # Highest ZeRO stage the strategy supports (penalties that read weights outside a module's forward need <= 2).
    max_zero_stage: ClassVar[int] = 3
    # Do all of the strategy's hooks leave weights to the engine's forward and optimizer (no surgery in `build`, no
    # `prepare`/`after_source`/`after_task` that reads or rewrites weights, no step hooks)? Then under ZeRO-3 the
    # platform keeps the model partitioned from construction to the export, and no rank ever holds all of it.
    # False: under ZeRO-3 the model is built whole and gathered between phases and at checkpoints (full weights).
    works_on_partitions: ClassVar[bool] = False
    # Backbone names (or prefixes) the strategy supports; None = all.
    supported_backbones: ClassVar[tuple[str, ...] | None] = None
    # Does `prepare` need the source pre-training trajectory (the stop points' state dicts)? (learning transfer)
    needs_trajectory: ClassVar[bool] = False
    # A strategy users list under `strategies:` to train target tasks; False for the platform's source pre-training.
    transfer: ClassVar[bool] = True
    # Task kinds (data/kinds.py) the strategy applies to; config refuses a stream of another kind before anything starts.
    task_kinds: ClassVar[tuple[str, ...]] = (CLASSIFICATION,)

    def __init__(self, params: StrategyParams, epochs: int, lr: float):
        self.params = params
        self.epochs = epochs
        self.lr = lr

    # -- hooks -------------------------------------------------------------------------------------------------------
    def build(self, model: TransferModel, tasks: list[TaskInfo]) -> None:
        """Structural surgery for the whole stream (full weights, before the engine)."""

    def phases(self, model: TransferModel, task: TaskInfo) -> list[Phase]:
        raise NotImplementedError

    def train_batches(self, model: TransferModel, task: TaskInfo, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                      data: TrainingData) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The micro-batches one epoch of `task` trains on, given this rank's shard of its training split (`batches`);
        a strategy that changes the data (replay) mixes other training examples in. Called on every rank."""
        return batches

    def training_forward(self, engine: Callable, task: TaskInfo, x: torch.Tensor,
                         y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, loss) of one training micro-batch through the engine's forward: the task's head and its kind's
        loss, unless the strategy's batches hold examples of other tasks (replay routes each through its own head)."""
        logits = engine(x, task.index)
        return logits, task_loss(task.kind, logits, y)

    def extra_loss(self, model: TransferModel, x: torch.Tensor, y: torch.Tensor, task: TaskInfo,
                   logits: torch.Tensor) -> torch.Tensor | None:
        return None

    def after_task(self, model: TransferModel, task: TaskInfo, batches: Callable[[], Iterator[tuple]],
                   all_reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Called on every rank after a task's last phase; `batches()` yields this rank's (x, y) training shard."""

    def after_source(self, model: TransferModel, source: TaskInfo, batches: Callable[[], Iterator[tuple]],
                     all_reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Called on every rank once before the first target task, on the pre-trained model, with the source's
        training shard: what to keep of the pre-trained state (anchors, Fisher information, frozen copies)."""

    def check(self, cfg, tasks: list, load_weights: Callable[[str], dict]) -> None:
        """Whole-experiment checks run before Ray starts (`cfg` the ExperimentConfig, `tasks` the built stream);
        raise ValueError naming the field and the fix."""

    def prepare(self, model: TransferModel, ctx: PrepareContext) -> None:
        """Called on every rank once, right after the pre-trained weights are loaded and before `after_source` and
        the first target task (full weights, no engine): may replace the starting weights (e.g. with weights
        synthesised from the pre-training trajectory)."""

    @classmethod
    def identity_tags(cls) -> dict[str, str]:
        """Which strategy ran, from which paper, and how faithfully (STRATEGIES.md): on every run and result."""
        return {"strategy": cls.name, "strategy_source": cls.paper, "fidelity": cls.fidelity}

    def tags(self) -> dict[str, str]:
        """The MLflow tags of a run of this strategy: its identity plus what its settings make worth filtering on."""
        return self.identity_tags()


# -- helpers shared by strategies ----------------------------------------------------------------------------------------

def head_params(model: TransferModel, task: TaskInfo) -> list[nn.Parameter]:
    return list(model.heads[head_key(task.index)].parameters())


def backbone_params(model: TransferModel) -> list[nn.Parameter]:
    return list(model.backbone.parameters())


def count_params(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def check_trajectory_ends(epochs: list[int], final_epoch: int) -> None:
    """A pre-training trajectory runs from θ⁰ (epoch 0, the initialisation) to θᵀ (its final epoch); a strategy that
    needs the trajectory refuses one without either end (ValueError naming the missing point and the fix)."""
    for epoch, which, symbol in ((0, "first", "θ⁰"), (final_epoch, "final", "θᵀ")):
        if epoch not in epochs:
            raise ValueError(f"the pre-training trajectory has no stop point at its {which} epoch, i.e. no stop point "
                             f"{symbol} (epoch {epoch}); it has {sorted(epochs)}: re-run the pre-training from scratch "
                             f"(remove its trajectory.json) so it completes")
