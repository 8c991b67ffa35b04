"""The torch optimizer of an optimizer config (sgd / adam / adamw), for the platform's engines and for strategies
that train by themselves (the oracle of learning transfer)."""
from __future__ import annotations

from typing import Any, Protocol

import torch


class OptimizerSettings(Protocol):
    """What an optimizer needs of a config (`forgetless.config.OptimConfig` has these fields)."""

    optimizer: str
    lr: float
    weight_decay: float
    momentum: float


def make_torch_optimizer(groups: list[dict[str, Any]], settings: OptimizerSettings,
                         fused: bool = False) -> torch.optim.Optimizer:
    """`groups`: torch param groups (each with its own "lr"); the first group's lr is the default. `fused`: torch's
    fused Adam/AdamW kernels (CUDA and, from torch 2.4, CPU); SGD ignores it."""
    lr = groups[0].get("lr", settings.lr)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": settings.weight_decay}
    if fused:
        kwargs["fused"] = True
    cls = torch.optim.Adam if settings.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, **kwargs)
