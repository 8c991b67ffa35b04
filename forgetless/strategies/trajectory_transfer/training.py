"""The source task as the transfer sees it, on every rank: gradients and validation accuracy at given weights
(BatchNorm statistics recomputed), and the oracle's real training of θ₂. Data-parallel by hand: every rank draws the
same global mini-batch and takes its slice; gradients and BatchNorm statistics are averaged over the ranks."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from forgetless._compat import torch as compat_torch
from forgetless.data.sharding import equal_shard, rank_slice
from forgetless.strategies.base import PrepareContext
from forgetless.strategies.optim import make_torch_optimizer
from forgetless.strategies.permutations import State


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, compat_torch.batch_norm_types()) for m in model.modules())


def _train_without_dropout(model: nn.Module) -> None:
    """Training mode (BatchNorm on batch statistics, as in the training that made the trajectory) with dropout off, so
    two networks compute the same function of a batch."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                        all_reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Reset every BatchNorm's running statistics and re-estimate them (a plain average over the batches, spread
    over the ranks) for the current weights: interpolated or permuted weights make the old statistics meaningless."""
    bns = [m for m in model.modules() if isinstance(m, compat_torch.batch_norm_types())]
    saved = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    _train_without_dropout(model)
    for x, _ in batches:
        model.backbone(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
        all_reduce_mean(m.running_mean)
        all_reduce_mean(m.running_var)
    model.train(was_training)


def selection_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of n training samples split at random (fixed by `seed`) into (fit, selection): the selection part,
    `fraction` of them (at least one when fraction > 0), chooses the transferred step t; the rest gives the gradients
    and BatchNorm statistics. fraction 0: every index fits, none selects."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = max(1, round(fraction * n)) if fraction > 0 else 0
    return order[k:], order[:k]


class SourceObjective:
    """The source training loss's gradient and the accuracy that chooses t at given values of the parameters `keys`
    of `scratch` (a working copy of the model). Every rank must call both: they reduce across ranks.

    t is chosen on a selection split of its own (`selection_fraction` of the source training data, held out of the
    gradients), so the source validation accuracy reported at the chosen t is an honest estimate; with
    `selection_fraction` 0 t is chosen on the validation split (the paper's protocol), which then inflates it."""

    def __init__(self, scratch: nn.Module, keys: list[str], ctx: PrepareContext, batch_size: int, bn_batches: int,
                 seed: int, selection_fraction: float = 0.0):
        self.scratch, self.keys, self.ctx = scratch, keys, ctx
        self.batch_size, self.bn_batches = batch_size, bn_batches
        self.gen_seed = seed * 1_000_003
        self.params = dict(scratch.named_parameters())
        self.has_bn = has_batchnorm(scratch)
        self.fit_idx, self.selection_idx = selection_split(len(ctx.source_train[0]), selection_fraction, seed)

    def batch(self, batch_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same global mini-batch (of the fit part) on every rank; each rank takes its slice, gradients are then
        averaged."""
        x_train, y_train = self.ctx.source_train
        g = torch.Generator().manual_seed(self.gen_seed + batch_id)
        idx = self.fit_idx[torch.randperm(len(self.fit_idx), generator=g)[: self.batch_size]]
        mine = rank_slice(idx, self.ctx.rank, self.ctx.world, at_least_one=True)
        return x_train[mine].to(self.ctx.device), y_train[mine].to(self.ctx.device)

    def load(self, state: State) -> None:
        with torch.no_grad():
            for k in self.keys:
                self.params[k].copy_(state[k])

    def gradient(self, state: State, batch_id: int) -> State:
        self.load(state)
        _train_without_dropout(self.scratch)
        x, y = self.batch(batch_id)
        loss = F.cross_entropy(self.scratch(x, 0), y)
        grads = torch.autograd.grad(loss, [self.params[k] for k in self.keys])
        flat = self.ctx.all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
        out, i = {}, 0
        for k in self.keys:
            n = self.params[k].numel()
            out[k] = flat[i: i + n].view_as(self.params[k]).detach().cpu()
            i += n
        return out

    def evaluate(self, state: State) -> float:
        """The selection accuracy of `state` (the validation accuracy without a selection split); leaves `state` in
        `scratch`, with its BatchNorm statistics."""
        self.load(state)
        if self.has_bn:
            recompute_batchnorm(self.scratch, [self.batch(10**6 + b) for b in range(self.bn_batches)],
                                self.ctx.all_reduce_mean)
        return self.selection_accuracy() if len(self.selection_idx) else self.validation_accuracy()

    def validation_accuracy(self) -> float:
        """Source validation accuracy of the weights now in `scratch` (sharded and reduced by the platform)."""
        return self.ctx.source_accuracy(self.scratch)

    @torch.no_grad()
    def selection_accuracy(self) -> float:
        """Accuracy of `scratch` on the selection split: each rank its equal slice, the mean over ranks."""
        x, y = self.ctx.source_train
        mine = rank_slice(self.selection_idx, self.ctx.rank, self.ctx.world, at_least_one=True)
        was = self.scratch.training
        self.scratch.eval()
        correct = (self.scratch(x[mine].to(self.ctx.device), 0).argmax(1) == y[mine].to(self.ctx.device)).float()
        self.scratch.train(was)
        return float(self.ctx.all_reduce_mean(correct.mean().reshape(1)))


def train_for_real(scratch: nn.Module, theta2_0: State, keys: list[str], ctx: PrepareContext,
                   epochs: int | None, seed: int) -> State:
    """The oracle's real training of θ₂ on the source with the pre-training's recipe (optimizer, lr, batch, epochs);
    data-parallel by hand: each rank's gradient on its slice is averaged before an identical step on every rank."""
    opt_cfg = ctx.pretrain
    params = dict(scratch.named_parameters())
    with torch.no_grad():
        for k in keys:
            params[k].copy_(theta2_0[k].to(params[k].device))
    trainable = [params[k] for k in keys]
    opt = make_torch_optimizer([{"params": trainable, "lr": opt_cfg.lr}], opt_cfg)
    x, y = ctx.source_train
    scratch.train()
    for epoch in range(epochs or opt_cfg.epochs):
        mine = equal_shard(len(x), ctx.rank, ctx.world, torch.Generator().manual_seed(seed * 7919 + epoch))
        for i in range(0, len(mine), opt_cfg.batch_size):
            b = mine[i: i + opt_cfg.batch_size]
            loss = F.cross_entropy(scratch(x[b].to(ctx.device), 0), y[b].to(ctx.device))
            grads = torch.autograd.grad(loss, trainable)
            for prm, g in zip(trainable, grads):
                prm.grad = ctx.all_reduce_mean(g.detach().clone())
            opt.step()
    return {k: params[k].detach().clone() for k in keys}
