"""Experiment configuration: YAML that maps 1:1 onto typed pydantic models.

Every user error is caught here, before Ray starts, and reported as one `ConfigError` that names the field and the fix.
Strategy knobs are validated by the strategy's own config class (see `forgetless.strategies`), so adding a strategy
never touches this file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from forgetless.config_files import apply_overrides, read_yaml_mapping
from forgetless.config_sections import (
    BackboneConfig,
    DeepSpeedSpec,
    FaultToleranceSpec,
    OptimConfig,
    PretrainConfig,
    ScalingSpec,
    StrategyConfig,
    TrackingSpec,
    TrainConfig,
    _Strict,
    first_error,
)
from forgetless.data.eval_suites import EvalTaskConfig, check_eval_tasks
from forgetless.data.sharding import BatchSplitError, batch_plan
from forgetless.data.kinds import CAUSAL_LM
from forgetless.data.spec import TaskConfig
from forgetless.errors import ConfigError
from forgetless.hashing import short_hash
from forgetless.search_config import SearchConfig
from forgetless.strategies import available_strategies, get_strategy_class

# Names other modules import from here (the sections and the file reading live in config_sections / config_files).
__all__ = ["BackboneConfig", "ConfigError", "DeepSpeedSpec", "ExperimentConfig", "FaultToleranceSpec", "OptimConfig",
           "PretrainConfig", "ScalingSpec", "SearchConfig", "StrategyConfig", "TaskConfig", "TrackingSpec",
           "TrainConfig", "apply_overrides", "load_config", "read_yaml_mapping", "select_strategy"]
_first_error = first_error  # the old private name, still imported by a test


class ExperimentConfig(_Strict):
    """A transfer experiment: source task, target stream, backbone, pre-training, strategies, platform settings."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="the experiment's name: Ray Train run names, the MLflow parent run and the storage "
                                  "folder derive from it")
    seed: int = Field(0, description="seed of data splits, initialisation and shuffling; the same seed and config "
                                     "give the same runs (and reuse their checkpoints)")
    seeds: list[int] | None = Field(None, min_length=1, description="repeat every strategy (and the pre-training) "
                                    "once per seed; the table shows mean ± sd over them. None: `seed` only")
    storage: str = Field("./forgetless_runs", examples=["s3://my-bucket/forgetless"],
                         description="local folder or s3://bucket/prefix")
    ray_address: str | None = Field(None, description="None: embedded local Ray (or $RAY_ADDRESS when set)")
    source: TaskConfig = Field(description="the task the backbone is pre-trained on (its accuracy is what "
                                           "forgetting is measured on)")
    targets: list[TaskConfig] = Field(..., min_length=1, examples=[[{"dataset": "digits", "classes": [5, 6]}]],
                                      description="the stream of new tasks, learned in order (`target:` for one)")
    eval_tasks: list[EvalTaskConfig] = Field(
        default_factory=list, examples=[[{"kind": "multiple_choice", "dataset": "stdlib_docstrings"}]],
        description="causal_lm streams: tasks never trained, scored at every evaluation point (general-ability "
        "suites): held-out corpora (kind: causal_lm) and multiple-choice suites (kind: multiple_choice); extra "
        "columns of R with their own forgetting (docs/language_models.md)")
    evaluation: Literal["task_incremental", "class_incremental"] = Field(
        "task_incremental", description="task_incremental: each task scored with its own output head (the task is "
        "given); class_incremental: one prediction over the heads of every task seen so far (it is not)")
    score: Literal["accuracy", "token_probability"] = Field(
        "accuracy", description="what the accuracy matrix R (and so ACC, BWT, forgetting) holds, higher is better: "
        "accuracy (classification accuracy; next-token accuracy for causal_lm tasks) or token_probability "
        "(exp(-mean test loss): the geometric-mean probability of the right token or class, 1/perplexity)")
    require_disjoint_classes: bool = Field(
        False, description="refuse streams whose tasks share classes of the same dataset"
    )
    backbone: BackboneConfig = Field(default_factory=BackboneConfig, description="the network")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="source pre-training (skipped when "
                                                                                 "backbone.weights is set)")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the strategies' training on each target")
    strategies: list[StrategyConfig] = Field(..., min_length=1, description="the transfer strategies to run and "
                                                                            "compare (`strategy:` for one)")
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="workers per run and runs at once")
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec, description="the DeepSpeed engine")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="MLflow tracking")
    fault_tolerance: FaultToleranceSpec = Field(default_factory=FaultToleranceSpec,
                                                description="restarts after a lost worker",
                                                examples=[{"max_failures": -1}])
    search: SearchConfig | None = Field(None, description="Ray Tune search over stop points x lr (forgetless tune)")
    reference_strategy: str = Field(
        "finetune", examples=["lp_ft"], description="the strategy label every other is compared with in paired "
        "statistics over seeds (default finetune; when finetune is not listed, the first strategy)")

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
        self._check_worker_range()
        return self

    def _check_worker_range(self) -> None:
        """An elastic run keeps the global batch of its largest count: every count of the range must split it."""
        sc = self.scaling
        for section, optim in (("train", self.train), ("pretrain", self.pretrain)):
            try:
                batch_plan(optim.batch_size, self.deepspeed.gradient_accumulation_steps, sc.num_workers,
                           sc.num_workers, sc.worker_counts())
            except BatchSplitError as e:
                raise ValueError(f"scaling.num_workers: {e} ({section}.batch_size {optim.batch_size} x "
                                 f"{sc.num_workers} workers x {self.deepspeed.gradient_accumulation_steps} "
                                 f"accumulation); use a range whose counts all divide it, or another "
                                 f"{section}.batch_size") from None

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
            "workers": self.scaling.num_workers,  # the most workers: with batch_size, the global batch
        }
        return short_hash(relevant)

    def transfer_key(self, strategy: StrategyConfig) -> str:
        # not part of a run's identity: where it runs, how it is tracked and retried, how many run at once, the
        # other seeds of the invocation (`seed` is), and which score R holds (read from the stored test results)
        relevant = self.model_dump(exclude={"strategies", "tracking", "ray_address", "storage", "search",
                                             "fault_tolerance", "seeds", "score", "reference_strategy"})
        relevant["scaling"].pop("max_concurrent")
        # nor the fewest workers of an elastic run: its global batch (train.batch_size x the most workers x
        # accumulation) and data order are the same at every count (data/sharding.py)
        relevant["scaling"].pop("min_workers")
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
            raise ConfigError(f"strategy: {first_error(e)}") from None
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
        raise ConfigError(f"invalid config: {first_error(e)}") from None
