"""The sections of an experiment config (`backbone:`, `pretrain:`, `train:`, `strategies:`, `scaling:`, `deepspeed:`,
`tracking:`, `fault_tolerance:`), each a strict pydantic model; `forgetless.config` assembles them into the
ExperimentConfig and re-exports them (`from forgetless.config import OptimConfig` keeps working).

Every field has a description: docs/configuration.md is generated from them (tools/config_reference.py), and
tests/test_config_reference.py fails on a field without one.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from forgetless.backbones import available_backbones, check_backbone, is_known_backbone
from forgetless.strategies import available_strategies, get_strategy_class


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a YAML key must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackboneConfig(_Strict):
    """The network that is pre-trained on the source task and transferred to the targets."""

    name: str = Field("mlp", description="mlp | cnn2d | cnn1d | resnet1d (and registered extras); hf:FOLDER, "
                                         "timm:NAME, torchvision:NAME for large pretrained models "
                                         "(docs/large_models.md)")
    params: dict[str, Any] = Field(default_factory=dict, description="constructor arguments, e.g. hidden: [128, 64]")
    weights: str | None = Field(
        None, description="optional pretrained state dict (path or s3://); when set, pre-training is skipped"
    )

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if not is_known_backbone(v):
            raise ValueError(f"unknown backbone {v!r}; available: {available_backbones()}")
        return v

    @model_validator(mode="after")
    def _prefixed_backbone_ok(self) -> "BackboneConfig":
        # hf:/timm:/torchvision: check their folder and params here, before Ray starts (never the hub).
        check_backbone(self.name, self.params)
        return self


class OptimConfig(_Strict):
    """Optimizer settings shared by pre-training and transfer."""

    optimizer: Literal["sgd", "adam", "adamw"] = Field("adamw", description="the torch optimizer each engine steps")
    lr: float = Field(1e-3, gt=0.0, description="learning rate")
    weight_decay: float = Field(0.0, ge=0.0, examples=[0.01],
                                description="weight decay (decoupled for adamw, L2 for sgd and adam)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd only")
    batch_size: int = Field(32, gt=0, description="per-worker micro-batch size")
    epochs: int = Field(10, gt=0, description="passes over the training split, per task")
    eval_every_steps: int | None = Field(
        None, gt=0, description="also evaluate every N optimizer steps (finer learning curves); default: once per epoch"
    )


class TrainConfig(OptimConfig):
    """The transfer strategies' training (`train:`): the optimizer settings and an optional equal step budget."""

    step_budget: int | None = Field(
        None, gt=0, description="optimizer steps per target task, summed over a strategy's phases (align/probe "
        "included): each phase ends by its own rule or when the budget is spent, the last phase runs until it is "
        "spent; None: each phase runs its epochs")


class PretrainConfig(OptimConfig):
    """Source pre-training from scratch; every `checkpoint_every` epochs is a stop point of the trajectory."""

    epochs: int = Field(20, gt=0, description="epochs of source pre-training")
    checkpoint_every: int = Field(5, gt=0, description="save a stop point (a checkpoint transfer can start from) every "
                                                       "N epochs; θ⁰ and the last epoch are always saved")
    init_seed: int | None = Field(None, description="seed of θ⁰ (defaults to the experiment seed)")


class StrategyConfig(_Strict):
    """One transfer strategy to run (`strategies:` items; a bare name is read as `{name: NAME}`)."""

    name: str = Field(description="a registered strategy (docs/strategies.md; each one's params are listed at the end "
                                         "of docs/configuration.md)")
    params: dict[str, Any] = Field(default_factory=dict, description="the strategy's own settings, checked by its "
                                                                     "Config model (strategy params below)")
    label: str | None = Field(None, description="display name (e.g. to compare two settings of one strategy)")

    @model_validator(mode="after")
    def _known_and_valid(self) -> "StrategyConfig":
        try:
            cls = get_strategy_class(self.name)
        except KeyError:
            raise ValueError(f"unknown strategy {self.name!r}; available: {available_strategies()}") from None
        try:
            cls.Config(**self.params)
        except ValidationError as e:
            raise ValueError(f"strategy {self.name!r} params: {first_error(e)}") from None
        return self

    def display_name(self) -> str:
        return self.label or self.name


class ScalingSpec(_Strict):
    """How many Ray Train workers a run uses, and what each asks of the cluster."""

    num_workers: int = Field(2, gt=0, examples=[[1, 4]], description="Ray Train workers (data-parallel ranks) per "
                             "run; a range `[MIN, MAX]` (or `{min: MIN, max: MAX}`) makes the run elastic: it starts "
                             "with what fits, goes on with fewer when a node is lost and grows back at a checkpoint "
                             "when room returns (it then holds MAX, and min_workers MIN). The global batch is "
                             "train.batch_size x MAX x deepspeed.gradient_accumulation_steps at any count "
                             "(docs/reliability.md)")
    min_workers: int | None = Field(None, gt=0, description="an elastic run's fewest workers (set by a range "
                                    "num_workers); None: a fixed count")
    use_gpu: bool = Field(False, description="one GPU per worker (CUDA; DeepSpeed's CPU accelerator otherwise)")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs Ray reserves for each worker")
    max_concurrent: int = Field(0, ge=0, examples=[1], description="strategy runs at once (compare, seeds); 0 = as "
                                "many as the cluster's CPUs/GPUs fit; 1 = one after another")

    @model_validator(mode="before")
    @classmethod
    def _range(cls, data: Any) -> Any:
        # `num_workers: [1, 4]` / `{min: 1, max: 4}`: MAX stays in num_workers (what planning and the global batch
        # use), MIN goes to min_workers
        if not isinstance(data, dict) or isinstance(data.get("num_workers"), (int, str)) or "num_workers" not in data:
            return data
        given = data["num_workers"]
        if isinstance(given, dict) and set(given) == {"min", "max"}:
            low, high = given["min"], given["max"]
        elif isinstance(given, (list, tuple)) and len(given) == 2:
            low, high = given
        else:
            raise ValueError(f"num_workers: {given!r} is neither a count nor a range; write 2, [1, 2] or "
                             f"{{min: 1, max: 2}}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
            raise ValueError(f"num_workers: the range {given!r} must hold two whole numbers, e.g. [1, 2]")
        if low < 1:
            raise ValueError(f"num_workers: the range {given!r} starts below 1; an elastic run needs at least 1 worker")
        if "min_workers" in data and data["min_workers"] != low:
            raise ValueError("num_workers: give the range or min_workers, not both")
        return {**data, "num_workers": high, "min_workers": low}

    @model_validator(mode="after")
    def _min_within(self) -> "ScalingSpec":
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"num_workers: the range's min ({self.min_workers}) is above its max "
                             f"({self.num_workers}); write [MIN, MAX] with MIN <= MAX")
        return self

    @property
    def elastic(self) -> bool:
        """A range of worker counts (min < max): Ray Train's elastic worker group."""
        return self.min_workers is not None and self.min_workers < self.num_workers

    @property
    def fewest_workers(self) -> int:
        return self.min_workers if self.min_workers is not None else self.num_workers

    def worker_counts(self) -> range:
        """Every worker count the run may train on."""
        return range(self.fewest_workers, self.num_workers + 1)

    def ray_num_workers(self) -> int | tuple[int, int]:
        """Ray Train's ScalingConfig(num_workers=...): a count, or (min, max) for an elastic run."""
        return (self.fewest_workers, self.num_workers) if self.elastic else self.num_workers

    def describe_workers(self) -> str:
        return f"{self.fewest_workers}-{self.num_workers} workers (elastic)" if self.elastic else \
            f"{self.num_workers} workers"


class DeepSpeedSpec(_Strict):
    """The DeepSpeed engine every worker trains with (ZeRO stage, precision, offload)."""

    zero_stage: int = Field(2, ge=0, le=3, description="ZeRO stage: 0 none, 1 optimizer states, 2 + gradients, 3 + "
                                                       "weights partitioned across workers")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    gradient_accumulation_steps: int = Field(1, gt=0, examples=[4], description="micro-batches per optimizer step")
    gradient_clipping: float = Field(1.0, ge=0.0, examples=[0.0],
                                     description="clip the global gradient norm to this (1.0: DeepSpeed's and "
                                                 "Hugging Face Trainer's default); 0: no clipping")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="ZeRO-Offload: optimizer states (and the "
                                                                          "Adam step) in CPU memory")
    offload_param: Literal["none", "cpu"] = Field("none", description="ZeRO-3: weights in CPU memory between uses")
    extra: dict[str, Any] = Field(default_factory=dict, examples=[{"wall_clock_breakdown": True}],
                                  description="merged into the DeepSpeed config as-is")
    partitions_only: bool = Field(
        False, description="ZeRO-3: refuse, before anything starts, a strategy that would build or gather the whole "
                           "model on every worker (one not `works_on_partitions`: docs/large_models.md)")

    @model_validator(mode="after")
    def _partitions_need_zero3(self) -> "DeepSpeedSpec":
        if self.partitions_only and self.zero_stage != 3:
            raise ValueError(f"partitions_only: only ZeRO stage 3 partitions the weights; set zero_stage: 3 (it is "
                             f"{self.zero_stage}) or remove partitions_only")
        return self


class FaultToleranceSpec(_Strict):
    """What a run does when a worker dies (spot preemption, OOM, node loss): Ray Train restarts the worker group and
    the run continues from its latest intact checkpoint. It does not shape results, so it is not part of run names."""

    max_failures: int = Field(
        3, ge=-1, examples=[-1], description="worker-group restarts before the run fails (Ray Train FailureConfig); "
                                             "-1: no limit, 0: fail on the first lost worker"
    )


class TrackingSpec(_Strict):
    """Where runs are tracked in MLflow."""

    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db in the cwd"
    )
    experiment: str = Field("forgetless", description="the MLflow experiment the runs are logged under")
    log_model: bool = Field(True, description="log each strategy's trained model to MLflow (a logged model)")


def first_error(e: ValidationError) -> str:
    """The first error of a pydantic validation, as `field.path: message`."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg
