"""Which samples each data-parallel rank sees, and the seeds that order them (one place for both).

Every rank gets the same number of samples, so every rank runs the same number of steps: DeepSpeed's collectives (and
hand-written all-reduces) must match across ranks. The few samples beyond a multiple of `world` are dropped for that
epoch only (the order changes every epoch).
"""
from __future__ import annotations

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


def shard_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, rank: int, world: int,
                  seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's mini-batches of one epoch, in an order fixed by `seed` (the same on every rank)."""
    idx = equal_shard(len(x), rank, world, torch.Generator().manual_seed(seed))
    for i in range(0, len(idx), batch_size):
        b = idx[i : i + batch_size]
        yield x[b], y[b]
