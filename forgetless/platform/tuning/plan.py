"""The search plan: every check that can run before Ray starts, each trial's config, and the Tune search space.

`validate_search` narrows the experiment to the trials' strategy and checks the stop points, the searched fields and
their values, and the ASHA schedule (no Ray cluster needed); `param_space` and `search_alg` turn the plan into what Ray
Tune samples.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator

from forgetless.config import ConfigError, ExperimentConfig, load_config, select_strategy
from forgetless.hashing import short_hash
from forgetless.search_config import STOP_POINT, RangeSpec, SearchConfig
from forgetless.platform.tuning.objective import tune_metric_and_mode
from forgetless.strategies import get_strategy_class

# Fields a trial may change. Everything that shapes pre-training (source, backbone, pretrain, seed) is shared by all
# trials, and scaling decides how many trials fit at once, so those are not searchable.
SEARCHABLE_ROOTS = ("train", "strategy", "targets", "deepspeed", "evaluation")


@dataclass
class SearchPlan:
    """A validated search: the experiment narrowed to the trials' strategy, and the stop points to search."""

    name: str
    cfg: ExperimentConfig  # one strategy, `search` removed: the base every trial's config derives from
    search: SearchConfig
    stop_points: list[int]

    @property
    def max_t(self) -> int:
        return self.search.asha.max_t or self.cfg.train.epochs


def planned_stop_points(cfg: ExperimentConfig) -> list[int]:
    """The epochs pre-training saves as stop points: θ⁰, every `checkpoint_every` epochs, and the last."""
    p = cfg.pretrain
    return sorted({0, p.epochs, *range(p.checkpoint_every, p.epochs + 1, p.checkpoint_every)})


def field_path(key: str) -> str:
    """`strategy.<param>` is shorthand for the (single) strategy's params; other keys are config paths."""
    root, _, rest = key.partition(".")
    return f"strategies.0.params.{rest}" if root == "strategy" else key


# ---------------------------------------------------------------------------------------------------------------------
# is a searched key a field a trial may change?


def _check_root(data: dict[str, Any], key: str, root: str) -> None:
    if root in SEARCHABLE_ROOTS:
        return
    hint = ""
    if key in data.get("train", {}):
        hint = f" (did you mean train.{key}?)"
    elif root in data:
        hint = (f" ({root} is shared by every trial: it shapes pre-training or decides how many trials fit, so it "
                f"cannot vary within one search)")
    raise ConfigError(f"search.space: {key!r} is not a searchable field{hint}; search {STOP_POINT} and fields "
                      f"under {', '.join(SEARCHABLE_ROOTS)} (e.g. train.lr, strategy.<param>)")


def _check_strategy_param(base: ExperimentConfig, key: str, param: str) -> None:
    s = base.strategies[0]
    known = sorted(get_strategy_class(s.name).Config.model_fields)
    if param not in known:
        raise ConfigError(f"search.space: {key!r}: strategy {s.name!r} has no parameter {param!r}; its parameters: "
                          f"{known or 'none'}")


def _walk(data: dict[str, Any], key: str) -> Any:
    """The config node at the dotted path `key`; raises ConfigError naming the first part that is not there."""
    node: Any = data
    walked: list[str] = []
    for part in key.split("."):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"search.space: {key!r}: {'.'.join(walked)} has {len(node)} entries; {part!r} is "
                                  f"not an index of it")
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            where = ".".join(walked) or "the config"
            fields = sorted(node) if isinstance(node, dict) else []
            raise ConfigError(f"search.space: {key!r} is not a config field: {where} has no {part!r}; its fields: "
                              f"{fields}")
        walked.append(part)
    return node


def _check_field(base: ExperimentConfig, key: str) -> None:
    root, _, rest = key.partition(".")
    data = base.model_dump(mode="json")
    _check_root(data, key, root)
    if root == "strategy":
        _check_strategy_param(base, key, rest)
        return
    if isinstance(_walk(data, key), (dict, list)):
        raise ConfigError(f"search.space: {key!r} is a whole section; search its fields (e.g. {key}.<field>)")


# ---------------------------------------------------------------------------------------------------------------------
# validation (no Ray needed)


def _candidates(dim: list[Any] | RangeSpec) -> list[Any]:
    """The values a trial may get that are checked before the search starts: each listed value, or a range's ends and
    (a float range) a value with a fraction in between, so an integer field searched without `integer: true` fails
    here and not in a trial."""
    if isinstance(dim, RangeSpec):
        if dim.integer:
            return [int(dim.low), int(dim.high)]
        between = dim.low + 0.37 * (dim.high - dim.low)
        return [dim.low, between if between != int(between) else between + 0.1, dim.high]
    return list(dim)


def _value_error(key: str, dim: list[Any] | RangeSpec, value: Any, e: ConfigError) -> ConfigError:
    hint = ""
    if isinstance(dim, RangeSpec) and not dim.integer and "valid integer" in str(e):
        hint = f"; {key} is an integer field: add integer: true to its range"
    return ConfigError(f"search.space.{key}: value {value!r} is not valid: {e}{hint}")


def _stop_points(cfg: ExperimentConfig, search: SearchConfig) -> list[int]:
    planned = planned_stop_points(cfg)
    dim = search.space.get(STOP_POINT, "all")
    if dim == "all":
        return planned
    missing = [e for e in dim if e not in planned]
    if missing:
        raise ConfigError(
            f"search.space.{STOP_POINT}: no stop point at epoch {missing[0]}; pre-training "
            f"(pretrain.epochs={cfg.pretrain.epochs}, pretrain.checkpoint_every={cfg.pretrain.checkpoint_every}) "
            f"saves epochs {planned}; pick from those or change the pretrain schedule")
    return sorted(set(dim))


def _check_space(base: ExperimentConfig, search: SearchConfig, stop_points: list[int]) -> None:
    """Every searched field exists and may vary, and the ends of its range (or each listed value) make a valid
    experiment config."""
    for key, d in search.space.items():
        if key == STOP_POINT:
            continue
        _check_field(base, key)
        for value in _candidates(d):
            try:
                trial_config(base, {key: value, STOP_POINT: stop_points[0]}, "check")
            except ConfigError as e:
                raise _value_error(key, d, value, e) from None


def _check_asha(base: ExperimentConfig, search: SearchConfig) -> None:
    max_t = search.asha.max_t or base.train.epochs
    if search.scheduler == "asha" and search.asha.grace_period >= max_t:
        raise ConfigError(f"search.asha.grace_period ({search.asha.grace_period}) must be smaller than a trial's "
                          f"epochs ({max_t}), or ASHA can never stop a trial early; lower it or raise train.epochs")


def validate_search(cfg: ExperimentConfig, search: SearchConfig | None = None) -> SearchPlan:
    """Every check that can run before Ray starts; raises ConfigError naming the field and the fix."""
    search = search or cfg.search
    if search is None:
        raise ConfigError("search: the config has no `search:` section; add one (see docs/tune.md) or pass "
                          "search=... to forgetless.tune")
    one = select_strategy(cfg, search.strategy)
    # Trials run one strategy, so it is its own reference (a reference naming a strategy the trial lacks would make
    # every trial's config invalid).
    base = one.model_copy(update={"search": None, "reference_strategy": one.strategies[0].display_name()})
    stop_points = _stop_points(cfg, search)
    _check_space(base, search, stop_points)
    _check_asha(base, search)
    return SearchPlan(search_name(base, search), base, search, stop_points)


def search_name(base: ExperimentConfig, search: SearchConfig) -> str:
    """Deterministic: the same experiment and search give the same name (and so the same Tune experiment folder)."""
    relevant = {"experiment": base.model_dump(mode="json", exclude={"tracking", "ray_address", "storage",
                                                                   "reference_strategy"}),
                "search": search.model_dump(mode="json", exclude=_unset_pareto_fields(search))}
    return f"{base.name}-search-{short_hash(relevant)}"


def _unset_pareto_fields(search: SearchConfig) -> set[str]:
    # Fields added with Pareto searches leave a search's name (and so its --resume) as it was when they are unused.
    defaults = SearchConfig()
    return {f for f in ("objectives", "sampler", "population_size") if getattr(search, f) == getattr(defaults, f)}


def trial_config(base: ExperimentConfig, params: dict[str, Any], trial_id: str) -> ExperimentConfig:
    """The experiment config of one trial: the base with the trial's values; the strategy label names the trial (it
    becomes the MLflow child run's name and, through it, the trial's deterministic Ray Train run name)."""
    overrides = [f"{field_path(k)}={json.dumps(v)}" for k, v in params.items() if k != STOP_POINT]
    cfg = load_config(base, overrides) if overrides else base
    s = cfg.strategies[0]
    label = f"{s.display_name()}-sp{params[STOP_POINT]}-{trial_id}"
    return cfg.with_strategies([s.model_copy(update={"label": label})])


def max_concurrent_trials(cfg: ExperimentConfig, search: SearchConfig, resources: dict[str, float]) -> int:
    """How many trials run at once: what the cluster fits (workers x CPUs/GPUs per trial), or the user's lower cap."""
    sc = cfg.scaling
    need_cpu = sc.num_workers * sc.cpus_per_worker
    fits = int(resources.get("CPU", 0) // need_cpu)
    if sc.use_gpu:
        fits = min(fits, int(resources.get("GPU", 0) // sc.num_workers))
    what = f"{sc.num_workers} workers x {sc.cpus_per_worker:g} CPU{' + 1 GPU' if sc.use_gpu else ''}"
    have = f"{resources.get('CPU', 0):g} CPUs" + (f" and {resources.get('GPU', 0):g} GPUs" if sc.use_gpu else "")
    if fits < 1:
        raise ConfigError(f"scaling: one trial needs {what} but the Ray cluster has {have}; lower scaling.num_workers "
                          f"or scaling.cpus_per_worker")
    if search.max_concurrent_trials is not None and search.max_concurrent_trials > fits:
        raise ConfigError(f"search.max_concurrent_trials: {search.max_concurrent_trials} trials of {what} each do not "
                          f"fit the Ray cluster ({have}); at most {fits} fit at once: lower it to {fits} or leave it "
                          f"unset")
    return search.max_concurrent_trials or fits


# ---------------------------------------------------------------------------------------------------------------------
# what Ray Tune samples


def _domain(dim: list[Any] | RangeSpec, searcher: str):
    if isinstance(dim, RangeSpec):
        if dim.integer:
            return tune.lograndint(int(dim.low), int(dim.high) + 1) if dim.log else tune.randint(int(dim.low),
                                                                                                  int(dim.high) + 1)
        return tune.loguniform(dim.low, dim.high) if dim.log else tune.uniform(dim.low, dim.high)
    return tune.grid_search(list(dim)) if searcher == "grid" else tune.choice(list(dim))


def param_space(plan: SearchPlan) -> dict[str, Any]:
    space = {STOP_POINT: _domain(plan.stop_points, plan.search.searcher)}
    for key, dim in plan.search.space.items():
        if key != STOP_POINT:
            space[key] = _domain(dim, plan.search.searcher)
    return space


def _optuna_sampler(search: SearchConfig):
    # Deferred: optuna is an optional dependency (the `search` extra), needed by optuna searches only.
    import optuna

    if search.sampler == "nsga2":
        from forgetless.platform.tuning.optuna_samplers import ResumableNSGAIISampler

        return ResumableNSGAIISampler(seed=search.seed, population_size=search.population_size)
    # TPE handles several objectives itself (multi-objective TPE) when the study has several directions. Its first
    # n_startup_trials are random (Optuna's default 10 would make a search of 10 trials or fewer a random search).
    return optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=max(2, min(10, search.num_samples // 3)))


def search_alg(search: SearchConfig, concurrency: int):
    """The searcher: Optuna's TPE or NSGA-II (several objectives: Optuna's multi-objective study, told every
    objective's validation value when a trial completes), or Tune's grid / random generator."""
    if search.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        # TuneConfig.max_concurrent_trials wraps this searcher in a ConcurrencyLimiter.
        if search.objectives is not None:
            # Several metrics are given to the searcher itself: Tune's own metric/mode take one metric only.
            metric, mode = tune_metric_and_mode(search)
            return OptunaSearch(metric=metric, mode=mode, sampler=_optuna_sampler(search))
        return OptunaSearch(sampler=_optuna_sampler(search))
    # Tune ignores TuneConfig.max_concurrent_trials for a BasicVariantGenerator it is handed: set it here.
    return BasicVariantGenerator(random_state=search.seed, max_concurrent=concurrency)
