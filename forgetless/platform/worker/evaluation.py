"""Sharded evaluation inside a Ray Train worker: every rank scores its share of each task, the sums are all-reduced."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from forgetless.backbones import TransferModel
from forgetless.data import TaskData
from forgetless.data.eval_suites import EvalSuite
from forgetless.data.kinds import CAUSAL_LM, per_sample_scores
from forgetless.data.mc_tasks import ChoiceSequences, choice_scores, sequence_loglik
from forgetless.platform.analysis.metrics import perplexity


@torch.no_grad()
def evaluate(model: TransferModel, tasks: list[TaskData], split: str, stage: int, class_incremental: bool, rank: int,
             world: int, device: torch.device, batch_size: int = 256) -> dict[int, tuple[float, float]]:
    """(accuracy, mean loss) for every task, each rank on its shard, summed over ranks; for a causal-LM task the
    next-token accuracy and the mean token loss (data/kinds.py).

    Shards are padded to equal length (padding masked out) so that every rank runs the same forward passes; under
    ZeRO-3 each forward gathers parameters collectively, so a rank with one batch fewer would hang the others.
    """
    was_training = model.training
    model.eval()
    offsets = [0]
    for t in tasks:
        offsets.append(offsets[-1] + t.num_classes)
    out: dict[int, tuple[float, float]] = {}
    for j, task in enumerate(tasks):
        # class-incremental: one prediction over every head seen so far, labels shifted to their global ids
        heads = list(range(max(stage, j) + 1)) if class_incremental else j
        stats = _task_stats(model, task.kind, *task.split(split), heads, offsets[j] if class_incremental else 0, rank, world,
                            device, batch_size)
        if world > 1:
            dist.all_reduce(stats)
        out[j] = (float(stats[0] / stats[2]), float(stats[1] / stats[2]))
    model.train(was_training)
    return out


def _task_stats(model: TransferModel, kind: str, x: torch.Tensor, y: torch.Tensor, heads: int | list[int],
                label_offset: int, rank: int, world: int, device: torch.device, batch_size: int) -> torch.Tensor:
    """(correct, loss sum, count) of this rank's padded shard of one task (counts are tokens for causal-LM tasks)."""
    n = len(x)
    per_rank = math.ceil(n / world)
    idx = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    valid = idx < n
    idx = torch.where(valid, idx, torch.zeros_like(idx))
    stats = torch.zeros(3, dtype=torch.float64)
    for i in range(0, per_rank, batch_size):
        b, v = idx[i : i + batch_size], valid[i : i + batch_size].to(device)
        xb, yb = x[b].to(device), y[b].to(device) + label_offset
        correct, loss, count = per_sample_scores(kind, model(xb, heads), yb)
        stats[0] += correct[v].sum().item()
        stats[1] += loss[v].sum().item()
        stats[2] += count[v].sum().item()
    return stats


@torch.no_grad()
def evaluate_suites(model: TransferModel, suites: list[EvalSuite], split: str, rank: int, world: int,
                    device: torch.device, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Every eval task (data/eval_suites.py) through the source's output (head 0), sharded and summed over ranks like
    `evaluate`: a held-out corpus' next-token `acc`, mean token `loss` and `perplexity` on its `split`, a
    multiple-choice suite's `acc` and `acc_norm` (it has no splits)."""
    was_training = model.training
    model.eval()
    out: dict[str, dict[str, float]] = {}
    for suite in suites:
        if suite.choices is not None:
            out[suite.name] = choice_scores(_choice_loglik(model, suite.choices, rank, world, device, batch_size),
                                            suite.choices)
            continue
        stats = _task_stats(model, CAUSAL_LM, *suite.corpus.split(split), 0, 0, rank, world, device, batch_size)
        if world > 1:
            dist.all_reduce(stats)
        loss = float(stats[1] / stats[2])
        out[suite.name] = {"acc": float(stats[0] / stats[2]), "loss": loss, "perplexity": perplexity(loss)}
    model.train(was_training)
    return out


def _choice_loglik(model: TransferModel, seqs: ChoiceSequences, rank: int, world: int, device: torch.device,
                   batch_size: int) -> torch.Tensor:
    """Every row's summed choice log-likelihood: each rank scores its padded share of the rows (the same number of
    forwards everywhere), the vectors are summed over ranks."""
    n = len(seqs.tokens)
    per_rank = math.ceil(n / world)
    idx = torch.arange(rank * per_rank, min((rank + 1) * per_rank, n))
    loglik = torch.zeros(n, dtype=torch.float64)
    for i in range(0, per_rank, batch_size):
        b = idx[i : i + batch_size]
        rows = b if len(b) else torch.zeros(1, dtype=torch.long)  # a rank with no rows left still runs the forward
        tokens = seqs.tokens[rows].to(device)
        scores = sequence_loglik(model(tokens[:, None].float(), 0), tokens, seqs.start[rows].to(device),
                                 seqs.end[rows].to(device)).cpu()
        loglik[b] = scores[: len(b)]
    if world > 1:
        loglik = loglik.to(device)
        dist.all_reduce(loglik)
    return loglik.cpu()
