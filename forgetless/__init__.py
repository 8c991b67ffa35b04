"""forgetless: fine-tune pretrained backbones on new tasks without losing what they knew — and measure it.

Public API::

    import forgetless
    cfg = forgetless.load_config("examples/digits_transfer.yaml", overrides=["train.epochs=3"])
    result = forgetless.run(cfg, strategy="linear_probe")   # one strategy -> StrategyResult
    print(result.accuracy_matrix, result.metrics["forgetting/max"])
    comparison = forgetless.compare(cfg)                      # every strategy in the config -> CompareResult
    print(comparison.table())
"""
from __future__ import annotations

import os
from typing import Any, Union

from typing import TYPE_CHECKING

from forgetless.config import ConfigError, ExperimentConfig, load_config, select_strategy
from forgetless.platform.results import CompareResult, StrategyResult, Trajectory
from forgetless.search_config import SearchConfig

if TYPE_CHECKING:
    from forgetless.platform.tuning import SearchResult

# The driver's machinery (the runner with Ray Train and the plots, Ray Tune) is imported when a driver first calls
# run / compare / tune, not by this package's import: every Ray Train worker and the Train controller import
# forgetless (the worker function lives in it) and would pay ~1 s each for matplotlib and Tune (benchmarks/fixed_cost.py).

__version__ = "0.1.0"

# What every entry point accepts as a config: a YAML path, a mapping, or a loaded config.
ConfigLike = Union[str, os.PathLike, dict[str, Any], ExperimentConfig]


def run(config: ConfigLike, strategy: str | None = None, overrides: list[str] | None = None) -> StrategyResult:
    """Pre-train (or reuse the trajectory) and transfer under one strategy: the named one, or the config's only one."""
    # deferred: the driver's machinery (see above)
    from forgetless.platform.runner import execute

    cfg = select_strategy(load_config(config, overrides), strategy)
    return execute(cfg, "run").results[0]


def compare(config: ConfigLike, overrides: list[str] | None = None, seeds: list[int] | None = None,
            max_concurrent: int | None = None) -> CompareResult:
    """Every strategy in the config on the same stream, from the same pre-trained checkpoint; `seeds` repeats every
    strategy (and the pre-training) per seed (table: mean ± sd); `max_concurrent` caps the runs at once (default:
    as many as the cluster fits)."""
    # deferred: the driver's machinery (see above)
    from forgetless.platform.runner import execute

    cfg = load_config(config, overrides)
    if max_concurrent is not None:
        cfg = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"max_concurrent": max_concurrent})})
    return execute(cfg, "compare", seeds=seeds)


def tune(config: ConfigLike, search: "dict[str, Any] | SearchConfig | None" = None, resume: bool = False,
         overrides: list[str] | None = None) -> "SearchResult":
    """Ray Tune search over pre-training stop points x learning rates (x searchable strategy fields); `search`
    replaces the config's `search:` section. `resume=True` finishes a killed search. See docs/tune.md."""
    # deferred: the driver's machinery (see above)
    from forgetless.platform.tuning import run_search

    return run_search(config, search, resume=resume, overrides=overrides)


def __getattr__(name: str) -> Any:
    if name == "SearchResult":  # forgetless.SearchResult without importing Ray Tune at package import
        # deferred: the driver's machinery (see above)
        from forgetless.platform.tuning import SearchResult

        return SearchResult
    raise AttributeError(f"module 'forgetless' has no attribute {name!r}")


__all__ = ["run", "compare", "tune", "SearchConfig", "SearchResult", "load_config", "ConfigError", "ExperimentConfig", "StrategyResult", "CompareResult",
           "Trajectory"]
