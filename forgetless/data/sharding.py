"""Which samples each data-parallel rank sees, and the seeds that order them (one place for both).

The order of an epoch does not depend on the number of workers: a seeded permutation of the training split is cut into
global batches of `BatchPlan.global_batch` samples (train.batch_size x the most workers x gradient accumulation), and
each global batch is split among the ranks (rank r its r-th contiguous share), each share into the rank's micro-batches.
So 1, 2 or 4 workers take the same optimizer steps over the same samples; only who computes which part changes.

Every rank gets the same number of samples, so every rank runs the same number of steps: DeepSpeed's collectives (and
hand-written all-reduces) must match across ranks. The epoch's last, partial global batch keeps the largest multiple of
`BatchPlan.tail_multiple` samples (so that it, too, splits into equal micro-batches at every allowed worker count) and
drops the rest for that epoch only (the order changes every epoch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch


def derive_seed(*parts: int) -> int:
    """A deterministic seed from integers (Python's hash of strings differs between processes)."""
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**31 - 1)
    return s


def rank_slice(indices: torch.Tensor, rank: int, world: int, at_least_one: bool = False) -> torch.Tensor:
    """This rank's equal share of `indices` (contiguous slice); `at_least_one` keeps one sample per rank when there are
    fewer indices than ranks (every rank then computes on something)."""
    per_rank = len(indices) // world
    if at_least_one:
        per_rank = max(1, per_rank)
    return indices[rank * per_rank : (rank + 1) * per_rank]


def equal_shard(n: int, rank: int, world: int, generator: torch.Generator | None) -> torch.Tensor:
    """This rank's indices of a shuffled (with `generator`) or ordered (None) range of n samples."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return rank_slice(order, rank, world)


class BatchSplitError(ValueError):
    """A global batch that the allowed worker counts cannot split evenly."""


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is split at `world` workers: each rank takes `global_batch / world`
    samples as `accumulation` micro-batches of `micro_batch` each (the last, partial global batch of an epoch keeps a
    multiple of `tail_multiple` samples, split the same way into smaller micro-batches)."""

    global_batch: int
    world: int
    accumulation: int
    tail_multiple: int

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.world

    @property
    def micro_batch(self) -> int:
        return self.per_rank // self.accumulation


def accumulation_at(per_rank: int, max_micro_batch: int) -> int:
    """The fewest micro-batches of equal size, none larger than `max_micro_batch`, that hold `per_rank` samples."""
    k = math.ceil(per_rank / max_micro_batch)
    while per_rank % k:
        k += 1
    return k


def batch_plan(micro_batch: int, accumulation: int, max_workers: int, world: int,
               worker_counts: range | None = None) -> BatchPlan:
    """The split of the global batch (micro_batch x max_workers x accumulation, as configured) at `world` workers.

    The rule: each rank's share of a step is global_batch / world samples; its micro-batches are the fewest equal ones
    no larger than the configured micro-batch (memory), i.e. gradient accumulation grows as workers go (at
    max_workers it is the configured one). Every count in `worker_counts` (default: just `world`) must divide the
    global batch: BatchSplitError otherwise."""
    global_batch = micro_batch * max_workers * accumulation
    counts = worker_counts if worker_counts is not None else range(world, world + 1)
    tail = 1
    for w in counts:
        if global_batch % w:
            raise BatchSplitError(f"with {w} workers the global batch of {global_batch} samples does not split evenly")
        tail = math.lcm(tail, w * accumulation_at(global_batch // w, micro_batch))
    if global_batch % world:
        raise BatchSplitError(f"with {world} workers the global batch of {global_batch} samples does not split evenly")
    return BatchPlan(global_batch, world, accumulation_at(global_batch // world, micro_batch), tail)


def epoch_steps(n: int, plan: BatchPlan) -> int:
    """Optimizer steps of one epoch over n samples (the same at every worker count of the plan's range)."""
    return n // plan.global_batch + (1 if (n % plan.global_batch) // plan.tail_multiple else 0)


def shard_batches(x: torch.Tensor, y: torch.Tensor, plan: BatchPlan, rank: int,
                  seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches of one epoch, in an order fixed by `seed` alone (the same on every rank and at every
    worker count): `plan.accumulation` micro-batches per optimizer step."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(order), plan.global_batch):
        batch = order[start : start + plan.global_batch]
        if len(batch) < plan.global_batch:  # the epoch's tail: a multiple of tail_multiple, or nothing
            batch = batch[: len(batch) // plan.tail_multiple * plan.tail_multiple]
            if not len(batch):
                return
        share = rank_slice(batch, rank, plan.world)
        micro = len(share) // plan.accumulation
        for i in range(plan.accumulation):
            b = share[i * micro : (i + 1) * micro]
            yield x[b], y[b]
