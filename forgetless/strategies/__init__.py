"""Strategy registry. Each strategy is a module in this package that decorates its class with `@register`;
modules are discovered automatically, so adding a strategy is adding a file."""
from __future__ import annotations

import importlib
import pkgutil

from forgetless.strategies.base import Phase, ParamGroup, Strategy, StrategyParams, TaskInfo

_REGISTRY: dict[str, type[Strategy]] = {}
_LOADED = False


def register(cls: type[Strategy]) -> type[Strategy]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"strategy {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    # Modules and sub-packages alike (a strategy may be a folder, e.g. trajectory_transfer/, whose __init__ registers
    # it); iter_modules does not recurse, so a folder's inner modules are never taken for strategies.
    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in ("base",) and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    _LOADED = True


def get_strategy_class(name: str) -> type[Strategy]:
    _load_all()
    return _REGISTRY[name]


def available_strategies() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def make_strategy(name: str, params: dict, epochs: int, lr: float) -> Strategy:
    cls = get_strategy_class(name)
    return cls(cls.Config(**params), epochs=epochs, lr=lr)


__all__ = ["register", "get_strategy_class", "available_strategies", "make_strategy", "Strategy", "StrategyParams",
           "Phase", "ParamGroup", "TaskInfo"]
