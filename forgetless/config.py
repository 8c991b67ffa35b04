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
from forgetless.data.eval_suites import EvalTaskConfig, check_eval_tasks
from forgetless.data.kinds import CAUSAL_LM
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


class TrainConfig(OptimConfig):
    """The transfer strategies' training (`train:`): the optimizer settings and an optional equal step budget."""

    step_budget: int | None = Field(
        None, gt=0, description="optimizer steps per target task, summed over a strategy's phases (align/probe "
        "included): each phase ends by its own rule or when the budget is spent, the last phase runs until it is "
        "spent; None: each phase runs its epochs")


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
    max_concurrent: int = Field(0, ge=0, description="strategy runs at once (compare, seeds); 0 = as many as the "
                                "cluster's CPUs/GPUs fit; 1 = one after another")


class DeepSpeedSpec(_Strict):
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    gradient_accumulation_steps: int = Field(1, gt=0)
    gradient_clipping: float = Field(0.0, ge=0.0)
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_param: Literal["none", "cpu"] = "none"
    extra: dict[str, Any] = Field(default_factory=dict, description="merged into the DeepSpeed config as-is")
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
        3, ge=-1, description="worker-group restarts before the run fails (Ray Train FailureConfig); -1: no limit, "
                              "0: fail on the first lost worker"
    )


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
    seeds: list[int] | None = Field(None, min_length=1, description="repeat every strategy (and the pre-training) "
                                    "once per seed; the table shows mean ± sd over them. None: `seed` only")
    storage: str = Field("./forgetless_runs", description="local folder or s3://bucket/prefix")
    ray_address: str | None = Field(None, description="None: embedded local Ray (or $RAY_ADDRESS when set)")
    source: TaskConfig
    targets: list[TaskConfig] = Field(..., min_length=1)
    eval_tasks: list[EvalTaskConfig] = Field(
        default_factory=list, examples=[[{"kind": "multiple_choice", "dataset": "stdlib_docstrings"}]],
        description="causal_lm streams: tasks never trained, scored at every evaluation point (general-ability "
        "suites): held-out corpora (kind: causal_lm) and multiple-choice suites (kind: multiple_choice); extra "
        "columns of R with their own forgetting (docs/language_models.md)")
    evaluation: Literal["task_incremental", "class_incremental"] = "task_incremental"
    score: Literal["accuracy", "token_probability"] = Field(
        "accuracy", description="what the accuracy matrix R (and so ACC, BWT, forgetting) holds, higher is better: "
        "accuracy (classification accuracy; next-token accuracy for causal_lm tasks) or token_probability "
        "(exp(-mean test loss): the geometric-mean probability of the right token or class, 1/perplexity)")
    require_disjoint_classes: bool = Field(
        False, description="refuse streams whose tasks share classes of the same dataset"
    )
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    strategies: list[StrategyConfig] = Field(..., min_length=1)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    fault_tolerance: FaultToleranceSpec = Field(default_factory=FaultToleranceSpec)
    search: SearchConfig | None = Field(None, description="Ray Tune search over stop points x lr (forgetless tune)")
    reference_strategy: str = Field(
        "finetune", description="the strategy label every other is compared with in paired statistics over seeds "
        "(default finetune; when finetune is not listed, the first strategy)")

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
        if "reference_strategy" in self.model_fields_set and self.reference_strategy not in labels:
            raise ValueError(f"reference_strategy: {self.reference_strategy!r} is not a strategy label; use one of "
                             f"{labels}")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: {self.seeds} repeats a seed; list each seed once")
        if any(t.kind == CAUSAL_LM for t in [self.source, *self.targets]):
            _check_causal_lm(self)
        check_eval_tasks(self.eval_tasks, names, self.source.kind, self.source.tokenizer)
        return self

    # -- derived values -------------------------------------------------------------------------------------------
    def seed_list(self) -> list[int]:
        """The seeds an invocation runs: `seeds`, else the one `seed`."""
        return list(self.seeds) if self.seeds else [self.seed]

    def for_seed(self, seed: int) -> "ExperimentConfig":
        """This config as the run of one seed."""
        return self.model_copy(update={"seed": seed, "seeds": None})

    def reference_label(self) -> str:
        """The strategy paired statistics compare with: `reference_strategy`, or the first strategy when the default
        (finetune) is not listed."""
        labels = [s.display_name() for s in self.strategies]
        return self.reference_strategy if self.reference_strategy in labels else labels[0]

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
        # not part of a run's identity: where it runs, how it is tracked and retried, how many run at once, the
        # other seeds of the invocation (`seed` is), and which score R holds (read from the stored test results)
        relevant = self.model_dump(exclude={"strategies", "tracking", "ray_address", "storage", "search",
                                             "fault_tolerance", "seeds", "score", "reference_strategy"})
        relevant["scaling"].pop("max_concurrent")
        if relevant["train"]["step_budget"] is None:  # a run without a budget keeps the identity it had before one
            relevant["train"].pop("step_budget")
        if not relevant["eval_tasks"]:  # a run without eval tasks keeps the identity it had before them
            relevant.pop("eval_tasks")
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


def _check_causal_lm(cfg: ExperimentConfig) -> None:
    """A causal-LM stream: every task a corpus, a Hugging Face decoder with its LM head, strategies that apply.
    Fills in what follows from the backbone: its LM output and, where a task names none, its folder's tokenizer."""
    tasks = [cfg.source, *cfg.targets]
    if any(t.kind != CAUSAL_LM for t in tasks):
        raise ValueError("targets: a stream is all classification or all causal_lm tasks; give every task kind: "
                         "causal_lm (or none)")
    if not cfg.backbone.name.startswith("hf:"):
        raise ValueError(f"backbone.name: causal_lm tasks need a Hugging Face decoder folder (hf:PATH), not "
                         f"{cfg.backbone.name!r}; build one with python -m forgetless.platform.worker.lm_pretrain")
    if cfg.evaluation != "task_incremental":
        raise ValueError("evaluation: causal_lm tasks are scored per corpus; set evaluation: task_incremental")
    for s in cfg.strategies:
        kinds = get_strategy_class(s.name).task_kinds
        if CAUSAL_LM not in kinds:
            usable = [n for n in available_strategies() if CAUSAL_LM in get_strategy_class(n).task_kinds]
            raise ValueError(f"strategies: {s.name} does not apply to causal_lm tasks (it supports {list(kinds)}); "
                             f"strategies that do: {usable}")
    if cfg.backbone.params.get("output", "lm_logits") != "lm_logits":
        raise ValueError("backbone.params.output: causal_lm tasks read the decoder's next-token logits; remove it")
    cfg.backbone.params = {**cfg.backbone.params, "output": "lm_logits"}
    folder = cfg.backbone.name[len("hf:"):]
    if not folder.startswith("s3://"):
        # Ray workers run in their own working directory: a relative folder must mean the driver's
        folder = str(Path(folder).expanduser().resolve())
        cfg.backbone.name = f"hf:{folder}"
    for t in tasks:
        if t.tokenizer is None:
            t.tokenizer = folder


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

    List items are addressed by index (`strategies.0.params.alpha=0.1`); a missing mapping key is created (the schema
    then says whether it exists), a missing list item or a path through a plain value is a ConfigError.
    """
    data = json.loads(json.dumps(data))  # deep copy of plain data
    _expand_strategy_names(data)  # `strategies: [finetune]` -> mappings, so `strategies.0.params.x=...` has a place
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.epochs=3")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if "" in parts:
            raise ConfigError(f"--set {item!r}: {key.strip()!r} has an empty part; write dotted field names, "
                              f"e.g. --set train.epochs=3")
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, item, ".".join(parts[:depth]))
        _place(node, parts[-1], _parse_value(value), item, ".".join(parts[:-1]))
    return data


def _expand_strategy_names(data: dict[str, Any]) -> None:
    if isinstance(data.get("strategies"), list):
        data["strategies"] = [{"name": s} if isinstance(s, str) else s for s in data["strategies"]]


def _child(node: Any, part: str, item: str, where: str) -> Any:
    """The node under `node[part]` on the way down an override's path (a mapping created where none is)."""
    if isinstance(node, list):
        return node[_index(node, part, item, where)]
    if not isinstance(node, dict):
        raise _not_a_container(node, item, where)
    if node.get(part) is None:
        node[part] = {}
    return node[part]


def _place(node: Any, last: str, value: Any, item: str, where: str) -> None:
    if isinstance(node, list):
        node[_index(node, last, item, where)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise _not_a_container(node, item, where)


def _not_a_container(node: Any, item: str, where: str) -> ConfigError:
    return ConfigError(f"--set {item!r}: {where} is the value {node!r}, not a mapping or a list, so it has no fields; "
                       f"set {where} itself (--set {where}=...)")


def _index(node: list, part: str, item: str, where: str) -> int:
    try:
        i = int(part)
    except ValueError:
        raise ConfigError(f"--set {item!r}: {where} is a list, so {part!r} must be an item number "
                          f"(0 to {len(node) - 1})") from None
    if not 0 <= i < len(node):
        raise ConfigError(f"--set {item!r}: {where} has {len(node)} item(s), numbered 0 to {len(node) - 1}; "
                          f"there is no item {part}")
    return i


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
        data = read_yaml_mapping(Path(source))
    if overrides:
        data = apply_overrides(data, overrides)
    try:
        # model_validate, not ExperimentConfig(**data): a YAML key that is not a string (`1: x`) is a field error too.
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid config: {_first_error(e)}") from None


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The mapping a YAML config file holds; ConfigError (one line, with line and column for syntax) otherwise."""
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; pass the path of a YAML file (see examples/)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not a text file (byte {e.start} is not UTF-8); pass the "
                          f"path of a YAML file") from None
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({e.strerror}); check its permissions") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML {_yaml_where(e, text)}: {_yaml_problem(e)}; fix the YAML there") \
            from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields (name: ..., source: ...), "
                          f"not {type(data).__name__}")
    return data


def _yaml_where(e: yaml.YAMLError, text: str) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is not None:
        line, column = mark.line, mark.column
    else:  # a ReaderError (a character YAML does not allow) knows only its offset in the text
        offset = getattr(e, "position", 0)
        line = text.count("\n", 0, offset)
        column = offset - (text.rfind("\n", 0, offset) + 1)
    return f"at line {line + 1}, column {column + 1}"  # PyYAML counts from 0, editors from 1


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.reader.ReaderError):
        return f"character {e.character!r} is not allowed in YAML ({e.reason})"
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    mark = getattr(e, "context_mark", None)
    if context and mark is not None:  # where the unclosed bracket or quote began
        context += f" (begun at line {mark.line + 1}, column {mark.column + 1})"
    return " ".join((f"{context}: {problem}" if context else problem).split())
