"""Experiment configuration: YAML that maps 1:1 onto typed pydantic models.

Every user error is caught here, before Ray starts, and reported as one `ConfigError` that names the field and the fix.
Strategy knobs are validated by the strategy's own config class (see `forgetless.strategies`), so adding a strategy
never touches this file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from forgetless.backbones import available_backbones, check_backbone, is_known_backbone
from forgetless.data.spec import TaskConfig
from forgetless.errors import ConfigError
from forgetless.hashing import short_hash
from forgetless.search_config import SearchConfig
from forgetless.strategies import available_strategies, get_strategy_class


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a YAML key must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackboneConfig(_Strict):
    name: str = Field("mlp", description="mlp | cnn2d | cnn1d | resnet1d (and registered extras)")
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
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd only")
    batch_size: int = Field(32, gt=0, description="per-worker micro-batch size")
    epochs: int = Field(10, gt=0)
    eval_every_steps: int | None = Field(
        None, gt=0, description="also evaluate every N optimizer steps (finer learning curves); default: once per epoch"
    )


class PretrainConfig(OptimConfig):
    """Source pre-training from scratch; every `checkpoint_every` epochs is a stop point of the trajectory."""

    epochs: int = Field(20, gt=0)
    checkpoint_every: int = Field(5, gt=0)
    init_seed: int | None = Field(None, description="seed of θ⁰ (defaults to the experiment seed)")


class StrategyConfig(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
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
            raise ValueError(f"strategy {self.name!r} params: {_first_error(e)}") from None
        return self

    def display_name(self) -> str:
        return self.label or self.name


class ScalingSpec(_Strict):
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)


class DeepSpeedSpec(_Strict):
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    gradient_accumulation_steps: int = Field(1, gt=0)
    gradient_clipping: float = Field(0.0, ge=0.0)
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_param: Literal["none", "cpu"] = "none"
    extra: dict[str, Any] = Field(default_factory=dict, description="merged into the DeepSpeed config as-is")


class TrackingSpec(_Strict):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db in the cwd"
    )
    experiment: str = "forgetless"
    log_model: bool = True


class ExperimentConfig(_Strict):
    """A transfer experiment: source task, target stream, backbone, pre-training, strategies, platform settings."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    storage: str = Field("./forgetless_runs", description="local folder or s3://bucket/prefix")
    ray_address: str | None = Field(None, description="None: embedded local Ray (or $RAY_ADDRESS when set)")
    source: TaskConfig
    targets: list[TaskConfig] = Field(..., min_length=1)
    evaluation: Literal["task_incremental", "class_incremental"] = "task_incremental"
    require_disjoint_classes: bool = Field(
        False, description="refuse streams whose tasks share classes of the same dataset"
    )
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    train: OptimConfig = Field(default_factory=OptimConfig)
    strategies: list[StrategyConfig] = Field(..., min_length=1)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    search: SearchConfig | None = Field(None, description="Ray Tune search over stop points x lr (forgetless tune)")

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        # `target:` (one task) and `strategy:` (one strategy, by name or mapping) are accepted for readability.
        if isinstance(data, dict):
            data = dict(data)
            if "target" in data:
                if "targets" in data:
                    raise ValueError("give either 'target' or 'targets', not both")
                data["targets"] = [data.pop("target")]
            if "strategy" in data:
                if "strategies" in data:
                    raise ValueError("give either 'strategy' or 'strategies', not both")
                data["strategies"] = [data.pop("strategy")]
            if "strategies" in data and isinstance(data["strategies"], list):
                data["strategies"] = [{"name": s} if isinstance(s, str) else s for s in data["strategies"]]
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> "ExperimentConfig":
        names = [self.source.display_name()] + [t.display_name() for t in self.targets]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"task names must be unique, repeated: {sorted(dup)} (set `name:` on the tasks)")
        labels = [s.display_name() for s in self.strategies]
        if len(set(labels)) != len(labels):
            raise ValueError("strategies: two entries share a name; give each a distinct `label:`")
        if self.pretrain.checkpoint_every > self.pretrain.epochs:
            raise ValueError(
                f"pretrain.checkpoint_every ({self.pretrain.checkpoint_every}) is larger than pretrain.epochs "
                f"({self.pretrain.epochs}); lower it so at least one stop point is saved"
            )
        if self.require_disjoint_classes:
            _check_disjoint([self.source, *self.targets])
        return self

    # -- derived values -------------------------------------------------------------------------------------------
    def task_names(self) -> list[str]:
        return [self.source.display_name()] + [t.display_name() for t in self.targets]

    def pretrain_key(self) -> str:
        """Deterministic identity of the pre-training: same key = same trajectory, reusable."""
        relevant = {
            "seed": self.seed,
            "source": self.source.model_dump(),
            "backbone": self.backbone.model_dump(),
            "pretrain": self.pretrain.model_dump(),
            "workers": self.scaling.num_workers,
        }
        return short_hash(relevant)

    def transfer_key(self, strategy: StrategyConfig) -> str:
        relevant = self.model_dump(exclude={"strategies", "tracking", "ray_address", "storage", "search"})
        relevant["strategy"] = strategy.model_dump()
        return short_hash(relevant)

    def with_strategies(self, strategies: list[StrategyConfig]) -> "ExperimentConfig":
        return self.model_copy(update={"strategies": strategies})


def select_strategy(cfg: ExperimentConfig, name: str | None) -> ExperimentConfig:
    """The config narrowed to one strategy: `name` (a listed label/name, or any registered strategy), or its only one."""
    if name is None:
        if len(cfg.strategies) > 1:
            raise ConfigError(
                f"strategies: the config lists {len(cfg.strategies)} "
                f"({', '.join(s.display_name() for s in cfg.strategies)}); pick one (--strategy NAME / strategy=...) "
                f"or use compare"
            )
        return cfg
    chosen = [s for s in cfg.strategies if name in (s.name, s.display_name())]
    if not chosen:
        try:
            chosen = [StrategyConfig(name=name)]
        except ValidationError as e:
            raise ConfigError(f"strategy: {_first_error(e)}") from None
    return cfg.with_strategies(chosen[:1])


def _check_disjoint(tasks: list[TaskConfig]) -> None:
    seen: dict[tuple[str, int], str] = {}
    for t in tasks:
        if t.classes is None:
            raise ValueError(f"require_disjoint_classes: task {t.display_name()!r} uses all classes; list `classes:`")
        for c in t.classes:
            key = (t.dataset, c)
            if key in seen:
                raise ValueError(
                    f"require_disjoint_classes: class {c} of {t.dataset!r} is in both {seen[key]!r} and "
                    f"{t.display_name()!r}; make the class sets disjoint or set require_disjoint_classes: false"
                )
            seen[key] = t.display_name()


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def _parse_value(text: str) -> Any:
    # `--set a.b=3` should give an int, `--set a=[1,2]` a list: parse the value as YAML.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides (values parsed as YAML) to a raw config mapping.

    List items are addressed by index (`strategies.0.params.alpha=0.1`).
    """
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.epochs=3")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = node[_index(part, key)]
            else:
                if part not in node or node[part] is None:
                    node[part] = {}
                node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            node[_index(last, key)] = _parse_value(value)
        elif isinstance(node, dict):
            node[last] = _parse_value(value)
        else:
            raise ConfigError(f"--set {item!r}: {'.'.join(parts[:-1])} is not a mapping")
    return data


def _index(part: str, key: str) -> int:
    try:
        return int(part)
    except ValueError:
        raise ConfigError(f"--set {key!r}: {part!r} indexes a list and must be a number") from None


def load_config(
    source: str | os.PathLike | dict[str, Any] | ExperimentConfig, overrides: list[str] | None = None
) -> ExperimentConfig:
    """Load and validate a config from a YAML path, a mapping, or an existing config; raise ConfigError on problems."""
    if isinstance(source, ExperimentConfig):
        if not overrides:
            return source
        data = source.model_dump(mode="json")
    elif isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of fields")
    if overrides:
        data = apply_overrides(data, overrides)
    try:
        return ExperimentConfig(**data)
    except ValidationError as e:
        raise ConfigError(f"invalid config: {_first_error(e)}") from None
