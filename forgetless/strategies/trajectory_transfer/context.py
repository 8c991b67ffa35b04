"""A one-process `PrepareContext` (no Ray, no collectives), for scripts, benchmarks and unit tests."""
from __future__ import annotations

import torch
from torch import nn

from forgetless.strategies.base import PrepareContext
from forgetless.strategies.permutations import State


def local_context(source_train: tuple[torch.Tensor, torch.Tensor], source_val: tuple[torch.Tensor, torch.Tensor],
                  trajectory: list[tuple[int, State]], pretrain, log=print) -> PrepareContext:
    """A one-process PrepareContext (no Ray, no collectives), for scripts, benchmarks and unit tests."""
    metrics: list[tuple[int, dict[str, float]]] = []

    @torch.no_grad()
    def source_accuracy(model: nn.Module) -> float:
        was = model.training
        model.eval()
        x, y = source_val
        acc = float((model(x, 0).argmax(1) == y).float().mean())
        model.train(was)
        return acc

    ctx = PrepareContext(rank=0, world=1, device=torch.device("cpu"), source_train=source_train,
                         all_reduce_mean=lambda t: t, source_accuracy=source_accuracy, log=log,
                         log_metrics=lambda m, step: metrics.append((step, dict(m))),
                         load_weights=lambda uri: torch.load(uri, map_location="cpu", weights_only=True),
                         pretrain=pretrain, final_epoch=max(e for e, _ in trajectory), trajectory=trajectory)
    ctx.metrics = metrics  # what the strategy logged, for inspection
    return ctx
