"""Shared pieces of the penalty strategies (l2_sp, ewc, input_space_ci): per-parameter buffers kept in the model, the
diagonal Fisher information, and quadratic penalties.

Everything a strategy keeps lives in `model.extras` as buffers, so checkpoints (and resumes) capture it. The penalties
read parameters directly, outside a module's forward: under ZeRO-3 those would be empty partitions, which is why the
strategies using them declare `max_zero_stage = 2`.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.func import grad, vmap

from forgetless.data.kinds import CLASSIFICATION, sample_labels, task_loss


def _safe(name: str) -> str:
    # Buffer names cannot contain dots; parameter names do.
    return name.replace(".", "__")


class ParamStore(nn.Module):
    """One buffer per (kind, parameter): e.g. the anchor θ* and the Fisher F of every backbone parameter.

    The structure is created in `build()` (zeros, shaped like the parameters); values are filled in later
    (`after_source` / `after_task`), so a checkpoint restores into a freshly built model with the same keys.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], kinds: Iterable[str]):
        super().__init__()
        self.names = [n for n, _ in named_params]
        self.kinds = list(kinds)
        for n, p in named_params:
            for k in self.kinds:
                self.register_buffer(f"{k}__{_safe(n)}", torch.zeros(p.shape, dtype=torch.float32))
        # 1 once values were filled in (the penalty is off until then).
        self.register_buffer("filled", torch.zeros((), dtype=torch.float32))

    def get(self, kind: str, name: str) -> torch.Tensor:
        return getattr(self, f"{kind}__{_safe(name)}")

    @torch.no_grad()
    def set(self, kind: str, values: dict[str, torch.Tensor]) -> None:
        for n in self.names:
            self.get(kind, n).copy_(values[n].detach().float())
        self.filled.fill_(1.0)


def named(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Parameter]]:
    return [(prefix + n, p) for n, p in module.named_parameters()]


def quadratic_penalty(params: list[tuple[str, nn.Parameter]], store: ParamStore, weight_kind: str | None,
                      anchor_kind: str = "anchor") -> torch.Tensor:
    """Σ w · (θ − θ*)² over `params` (w = 1 without a weight kind)."""
    total = torch.zeros((), device=params[0][1].device)
    for n, p in params:
        d = p.float() - store.get(anchor_kind, n)
        total = total + ((store.get(weight_kind, n) * d * d).sum() if weight_kind else (d * d).sum())
    return total


def diagonal_fisher(model: nn.Module, params: list[tuple[str, nn.Parameter]],
                    logits_fn: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
                    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
                    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor], labels: str = "empirical",
                    max_samples: int | None = None, kind: str = CLASSIFICATION) -> dict[str, torch.Tensor]:
    """Diagonal Fisher F_i = E_x[(∂ log p(y|x) / ∂θ_i)²], from *per-sample* gradients (torch.func), averaged over this
    rank's shard and then over ranks.

    `logits_fn(param_overrides, x)` computes the task's logits with some parameters replaced (a functional call).
    labels: "empirical" uses the true labels; "true" samples y from the model's own predictive distribution
    (Kirkpatrick et al.'s Fisher). `kind`: the task kind, whose loss is the log-likelihood (a causal-LM sample's is the
    mean over its tokens). The model is put in eval mode (per-sample gradients need BatchNorm statistics fixed).
    """
    was_training = model.training
    model.eval()
    base = {n: p.detach() for n, p in params}
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in base.items()}
    count = torch.zeros((), dtype=torch.float64)

    def sample_loss(theta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return task_loss(kind, logits_fn(theta, x[None]), y[None])

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    # torch.func.grad differentiates inside; the outer no_grad only keeps the accumulated results out of any graph.
    with torch.no_grad():
        _accumulate(batches, per_sample_grads, logits_fn, base, sums, count, labels, max_samples, kind)
    model.train(was_training)
    # Mean over all samples of all ranks: sum and count are both averaged over ranks, so their ratio is the global mean.
    flat = torch.cat([s.flatten() for s in sums.values()] + [count.float().reshape(1)])
    flat = all_reduce_mean(flat)
    total = float(flat[-1])
    out, i = {}, 0
    for n, s in sums.items():
        out[n] = flat[i : i + s.numel()].view_as(s) / max(total, 1.0)
        i += s.numel()
    return out


def _accumulate(batches, per_sample_grads, logits_fn, base, sums, count, labels, max_samples, kind) -> None:
    seen = 0
    for x, y in batches():
        if max_samples is not None and seen >= max_samples:
            break
        if max_samples is not None:
            x, y = x[: max_samples - seen], y[: max_samples - seen]
        if labels == "true":
            with torch.no_grad():
                y = sample_labels(kind, logits_fn(base, x), y)
        g = per_sample_grads(base, x, y)
        for n in sums:
            sums[n] += g[n].float().pow(2).sum(0)
        count += len(x)
        seen += len(x)
