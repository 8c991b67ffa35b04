"""One training step, shared by the platform's loop (a DeepSpeed engine) and by anyone who trains a strategy's phase
with a plain torch optimizer (tests, scripts): a strategy is always tested against the loop it runs in.

Plain torch: the engine is anything with DeepSpeed's four training calls (`Engine`); `TorchEngine` gives a torch
optimizer those calls. Reading or rewriting weights in a phase's hooks goes through `WeightAccess`, which the platform
fills with ZeRO-3 gathering and DeepSpeed's master-copy write-back.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from forgetless.backbones.transfer_model import TransferModel
from forgetless.strategies.base import Phase, Strategy, TaskInfo


class Engine(Protocol):
    """The training calls of a DeepSpeed engine (`deepspeed.initialize`'s first result has exactly these)."""

    def __call__(self, x: torch.Tensor, heads: int) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    def is_gradient_accumulation_boundary(self) -> bool: ...


@dataclass
class WeightAccess:
    """How a phase's hooks see and change weights: `full()` makes full weights visible (ZeRO-3 gathers them), and
    `commit()` makes an in-place rewrite stick (DeepSpeed steps its own fp32 master copy)."""

    full: Callable[[], AbstractContextManager] = nullcontext
    commit: Callable[[], None] = lambda: None


def set_trainable(model: nn.Module, phase: Phase) -> None:
    """Exactly the phase's parameters require grad; everything else is frozen (and so stays bit-identical)."""
    trainable = {id(p) for p in phase.trainable()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def set_train_mode(model: nn.Module, phase: Phase) -> None:
    model.train()
    for m in phase.eval_modules:
        m.eval()


def train_step(engine: Engine, model: TransferModel, strategy: Strategy, phase: Phase, task: TaskInfo,
               x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
               weights: WeightAccess = WeightAccess()) -> tuple[float, bool]:
    """Forward, loss (the task kind's: cross-entropy of classes or of next tokens, + the strategy's extra terms),
    backward and step on one micro-batch.

    Returns (loss, updated): under gradient accumulation the engine updates the weights only on the last micro-batch
    of each group, and only then do the phase's before/after-step hooks run.
    """
    if phase.augment is not None:
        x = phase.augment(x, generator)
    logits, loss = strategy.training_forward(engine, task, x, y)
    extra = strategy.extra_loss(model, x, y, task, logits)
    if extra is not None:
        loss = loss + extra
    engine.backward(loss)
    updated = engine.is_gradient_accumulation_boundary()
    if updated and phase.before_step is not None:
        with weights.full():
            phase.before_step(model)
    engine.step()
    if updated and phase.after_step is not None:
        with weights.full():
            phase.after_step(model)
            weights.commit()
    return loss.item(), updated


class TorchEngine:
    """A torch optimizer behind the `Engine` calls (no accumulation: every micro-batch is an update)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    def __call__(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return self.model(x, heads)

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def is_gradient_accumulation_boundary(self) -> bool:
        return True


def lr_scheduler(optimizer: torch.optim.Optimizer, phase: Phase) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The phase's per-group learning-rate multipliers as a LambdaLR (None when the phase has none)."""
    if phase.lr_multipliers is None:
        return None
    # LambdaLR takes one function per param group; the phase gives all multipliers at once.
    n = len(optimizer.param_groups)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s, i=i: phase.lr_multipliers(s)[i] for i in range(n)])
