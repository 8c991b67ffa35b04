"""The `search:` section of an experiment config: what a Ray Tune search over stop points and learning rates varies,
how it samples, what it optimises.

Only structure is checked here (this module imports nothing of forgetless, so `config.py` can use it). Checks that
need the rest of the experiment (does the field exist, is the stop point on the pre-training schedule) live in
`forgetless.platform.tuning.validate_search`, and run before Ray starts.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STOP_POINT = "stop_point"
# Metrics an objective can combine or a multi-objective search can trade off, by the names the runs log (the standard
# definitions of docs/metrics: `target/acc` is ACC over the target tasks, the source's own loss is `source/forgetting`).
# Per epoch they are computed from validation accuracies (what a search selects on); each finished trial also gets
# them on the test split (the accuracy matrix R: what is reported). A rename is one line here; the old name goes to
# METRIC_ALIASES so older configs and searches already in MLflow still read.
OBJECTIVE_METRICS = {
    "target/acc": "ACC: mean accuracy over the target tasks (per epoch: the target being trained)",
    "source/acc": "source accuracy",
    "source/retention": "source accuracy / source accuracy of the stop point",
    "source/forgetting": "source accuracy of the stop point - source accuracy now",
}
METRIC_ALIASES = {"forgetting": "source/forgetting", "acc": "target/acc"}
# The trade-off every search marks a Pareto front on (learning vs forgetting), unless `objectives` names its own.
DEFAULT_TRADE_OFF = (("target/acc", "max"), ("source/forgetting", "min"))


def metric_name(name: str) -> str:
    """The standard name of an objective metric (an alias is read as the metric it stands for)."""
    return METRIC_ALIASES.get(name, name)


def _known_metric(name: str) -> str:
    name = metric_name(name)
    if name not in OBJECTIVE_METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from {sorted(OBJECTIVE_METRICS)}")
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RangeSpec(_Strict):
    """A continuous (or integer) range, for the random and optuna searchers."""

    low: float = Field(description="the lowest value", examples=[0.0001])
    high: float = Field(description="the highest value (sampled values stay below it; integer ranges include it)",
                       examples=[0.01])
    log: bool = Field(False, description="sample log-uniformly (learning rates)")
    integer: bool = Field(False, description="sample integers in [low, high]")

    @model_validator(mode="after")
    def _ordered(self) -> "RangeSpec":
        if not self.low < self.high:
            raise ValueError(f"range needs low < high, got low={self.low} high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


class AshaSpec(_Strict):
    """Asynchronous successive halving: at epochs grace_period x reduction_factor^k, keep the top 1/reduction_factor."""

    grace_period: int = Field(1, gt=0, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1.0, examples=[3],
                                    description="at each rung keep the best 1/reduction_factor of trials")
    max_t: int | None = Field(None, gt=0, description="epochs of a full trial (default: train.epochs)")


class ObjectiveSpec(_Strict):
    """One objective of a multi-objective search: a metric and whether larger (max) or smaller (min) is better."""

    metric: str = Field(examples=["source/forgetting"],
                        description=f"one of {sorted(OBJECTIVE_METRICS)}, on validation data (selection); each "
                                    f"trial also reports it on the test split")
    direction: Literal["max", "min"] = Field(description="max: larger is better; min: smaller is better")

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        return _known_metric(v)


class SearchConfig(_Strict):
    space: dict[str, list[Any] | RangeSpec | Literal["all"]] = Field(
        default_factory=lambda: {STOP_POINT: "all"},
        description="`stop_point` (epochs of the pre-training trajectory, or 'all') and config fields by dotted path: "
                    "train.<field>, strategy.<param>, targets.<i>.<field>, deepspeed.<field>, evaluation; each a list "
                    "of values or a range {low, high, log, integer}",
    )
    searcher: Literal["grid", "random", "optuna"] = Field(
        "grid", description="grid: every combination of the listed values; random: num_samples draws; optuna: "
                            "num_samples trials, each chosen from the ones before (sampler)")
    sampler: Literal["tpe", "nsga2"] = Field(
        "tpe", description="optuna only: TPE (multi-objective TPE with several objectives) or NSGA-II (several "
                           "objectives; its first generation of population_size trials is random)")
    population_size: int = Field(8, ge=2, description="optuna + nsga2: trials per NSGA-II generation")
    num_samples: int = Field(1, gt=0, description="random/optuna: number of trials; grid: repeats of the whole grid")
    scheduler: Literal["fifo", "asha"] = Field("fifo", description="fifo: every trial runs its epochs; asha: stop "
                                                                   "trials behind at a rung early (asha)")
    asha: AshaSpec = Field(default_factory=AshaSpec, description="the ASHA scheduler's settings (scheduler: asha)",
                          examples=[{"grace_period": 2, "reduction_factor": 3}])
    objective: str | dict[str, float] = Field(
        "target/acc", description="a metric, or weights of a combination, e.g. {target/acc: 1, forgetting: -0.5}")
    mode: Literal["max", "min"] = Field("max", description="whether the objective is maximised or minimised")
    objectives: list[ObjectiveSpec] | None = Field(
        None, description="two or more {metric, direction}: a multi-objective search whose answer is the Pareto set "
                          "of trials on validation data (replaces objective/mode; no ASHA)")
    max_concurrent_trials: int | None = Field(
        None, gt=0, description="default: as many trials as the cluster fits (workers x CPUs/GPUs per trial)")
    strategy: str | None = Field(None, description="the strategy the trials fine-tune with (default: the config's only one)")
    seed: int = Field(0, description="seed of the random and optuna searchers' sampling", examples=[1])

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("the search space is empty; list at least stop_point or train.lr")
        for key, dim in v.items():
            if isinstance(dim, list) and not dim:
                raise ValueError(f"{key}: an empty list of values")
            if dim == "all" and key != STOP_POINT:
                raise ValueError(f"{key}: 'all' is only meaningful for {STOP_POINT}; give a list of values")
            if key == STOP_POINT and isinstance(dim, RangeSpec):
                raise ValueError(f"{STOP_POINT}: give a list of epochs or 'all', not a range")
            if key == STOP_POINT and isinstance(dim, list) and not all(isinstance(e, int) and e >= 0 for e in dim):
                raise ValueError(f"{STOP_POINT}: epochs must be non-negative integers, got {dim}")
        return v

    @field_validator("objective")
    @classmethod
    def _objective(cls, v: str | dict[str, float]) -> str | dict[str, float]:
        names = [v] if isinstance(v, str) else list(v)
        if not names:
            raise ValueError("the objective combines no metric")
        unknown = [n for n in names if metric_name(n) not in OBJECTIVE_METRICS]
        if unknown:
            raise ValueError(f"unknown metric {unknown[0]!r}; an objective combines {sorted(OBJECTIVE_METRICS)}")
        return metric_name(v) if isinstance(v, str) else {metric_name(k): w for k, w in v.items()}

    @model_validator(mode="after")
    def _several_objectives(self) -> "SearchConfig":
        if self.objectives is None:
            return self
        names = [o.metric for o in self.objectives]
        if len(names) < 2:
            raise ValueError("objectives: list two or more {metric, direction} (for one, use objective and mode)")
        if len(set(names)) < len(names):
            raise ValueError(f"objectives: each metric once, got {names}")
        if {"objective", "mode"} & self.model_fields_set:
            raise ValueError("objectives replaces objective and mode: give one or the other")
        if self.scheduler == "asha":
            raise ValueError("scheduler: asha cuts trials on one metric, which is not sound for several objectives "
                             "(a trial behind at a rung can still end on the front); use scheduler: fifo")
        return self

    @model_validator(mode="after")
    def _grid_needs_lists(self) -> "SearchConfig":
        if self.searcher == "grid":
            ranges = [k for k, d in self.space.items() if isinstance(d, RangeSpec)]
            if ranges:
                raise ValueError(f"space.{ranges[0]}: grid search needs a list of values; use searcher: random or "
                                 f"optuna for ranges")
        return self

    @property
    def multi_objective(self) -> bool:
        return self.objectives is not None

    def trade_off(self) -> list[tuple[str, str]]:
        """The (metric, direction) pairs the search's Pareto front is marked on: its objectives, or learning vs
        forgetting for a single-objective search."""
        if self.objectives is not None:
            return [(o.metric, o.direction) for o in self.objectives]
        return [tuple(p) for p in DEFAULT_TRADE_OFF]

    def weights(self) -> dict[str, float]:
        return {self.objective: 1.0} if isinstance(self.objective, str) else dict(self.objective)

    def describe_objective(self) -> str:
        if self.objectives is not None:
            return "pareto " + ", ".join(f"{o.direction} {o.metric}" for o in self.objectives)
        terms = " ".join(f"{'+' if w >= 0 else '-'} {'' if abs(w) == 1 else f'{abs(w):g}*'}{m}"
                         for m, w in self.weights().items())
        return f"{self.mode} {terms.removeprefix('+ ')}"
