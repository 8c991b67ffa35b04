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

import builtins
import importlib
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Union

if TYPE_CHECKING:
    from forgetless.config import ExperimentConfig, load_config, select_strategy
    from forgetless.errors import ConfigError
    from forgetless.platform.analysis.results import CompareResult, StrategyResult, Trajectory
    from forgetless.platform.tuning import SearchResult
    from forgetless.search_config import SearchConfig

# Nothing is imported by this package's import; each public name is imported when first used (`__getattr__`). Every
# process that imports any forgetless module imports this file first: the Ray Train workers (the worker function lives
# in forgetless) and the Train controller (platform/driver/train_controller.py). The controller runs no torch and the workers
# no Ray Tune or matplotlib: imported here, torch cost the controller ~2-5 s and Tune and the plots ~1 s per worker,
# on every run's path to its first step (benchmarks/fixed_cost.py, benchmarks/train_floor.py).
_LAZY = {"ConfigError": "forgetless.errors", "ExperimentConfig": "forgetless.config",
         "load_config": "forgetless.config", "select_strategy": "forgetless.config",
         "CompareResult": "forgetless.platform.analysis.results", "StrategyResult": "forgetless.platform.analysis.results",
         "Trajectory": "forgetless.platform.analysis.results", "SearchConfig": "forgetless.search_config",
         "SearchResult": "forgetless.platform.tuning"}

__version__ = "0.1.0"

# What every entry point accepts as a config: a YAML path, a mapping, or a loaded config.
ConfigLike = Union[str, os.PathLike, "dict[str, Any]", "ExperimentConfig"]


def run(config: ConfigLike, strategy: str | None = None, overrides: list[str] | None = None) -> StrategyResult:
    """Pre-train (or reuse the trajectory) and transfer under one strategy: the named one, or the config's only one."""
    with _caller_state_kept():  # (its imports too: `import ray` sets an environment variable and sys.excepthook)
        # deferred: the driver's machinery (see above)
        from forgetless.config import load_config, select_strategy
        from forgetless.platform.driver.runner import execute

        cfg = select_strategy(load_config(config, overrides), strategy)
        return execute(cfg, "run").results[0]


def compare(config: ConfigLike, overrides: list[str] | None = None, seeds: list[int] | None = None,
            max_concurrent: int | None = None) -> CompareResult:
    """Every strategy in the config on the same stream, from the same pre-trained checkpoint; `seeds` repeats every
    strategy (and the pre-training) per seed (table: mean ± sd); `max_concurrent` caps the runs at once (default:
    as many as the cluster fits)."""
    with _caller_state_kept():
        # deferred: the driver's machinery (see above)
        from forgetless.config import load_config
        from forgetless.platform.driver.runner import execute

        cfg = load_config(config, overrides)
        if max_concurrent is not None:
            cfg = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"max_concurrent": max_concurrent})})
        return execute(cfg, "compare", seeds=seeds)


def tune(config: ConfigLike, search: "dict[str, Any] | SearchConfig | None" = None, resume: bool = False,
         overrides: list[str] | None = None) -> "SearchResult":
    """Ray Tune search over pre-training stop points x learning rates (x searchable strategy fields); `search`
    replaces the config's `search:` section. `resume=True` finishes a killed search. See docs/tune.md."""
    with _caller_state_kept():
        # deferred: the driver's machinery (see above)
        from forgetless.platform.tuning import run_search

        return run_search(config, search, resume=resume, overrides=overrides)


@contextmanager
def _caller_state_kept() -> Iterator[None]:
    """The calling process as it was once an API call returns or raises: its environment (a run sets variables for
    the libraries it drives while it runs: DeepSpeed's build folder, Hugging Face's offline mode, MLflow's output,
    and ray.init its PYTHONBREAKPOINT hook) and its SIGINT / SIGTERM handlers (ray.init and every Ray Train fit set
    their own), its exception hooks and `print`. Where those are set, they are put back too (platform/driver/ray_cluster.py, trainer.handlers_kept);
    this is the promise of the API as a whole (tests/test_side_effects.py). Ray stays initialised, as after ray.init:
    the next call reuses the embedded cluster (docs/architecture.md, "Side effects of the Python API")."""
    environ = dict(os.environ)
    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    # `import ray` replaces sys.excepthook; Ray's progress-bar manager (started in the driver when a worker's library
    # shows a tqdm bar) replaces builtins.print
    hooks = (sys.excepthook, threading.excepthook, builtins.print)
    try:
        yield
    finally:
        sys.excepthook, threading.excepthook, builtins.print = hooks
        for key in [k for k in os.environ if k not in environ]:
            del os.environ[key]
        for key, value in environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        for s, handler in handlers.items():
            if handler is not None and signal.getsignal(s) is not handler:
                signal.signal(s, handler)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # imported once
        return value
    raise AttributeError(f"module 'forgetless' has no attribute {name!r}")


__all__ = ["run", "compare", "tune", "SearchConfig", "SearchResult", "load_config", "ConfigError", "ExperimentConfig", "StrategyResult", "CompareResult",
           "Trajectory"]
