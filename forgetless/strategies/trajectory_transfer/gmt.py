"""The learning-transfer loop (GMT / FGMT, and the naive and oracle baselines), independent of the platform: θ₂ᵗ =
θ₂⁰ + π(θ₁ᵗ − θ₁⁰), π re-matched on gradients at every step."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from forgetless.strategies.permutations import (PermutationSpec, Perms, State, apply_permutation, identity,
                                                weight_matching)
from forgetless.strategies.trajectory_transfer.trajectory import check_compatible

Gradient = Callable[[State, int], State]


@dataclass
class TransferResult:
    method: str
    val_acc: list[float]  # source validation accuracy of θ₂ᵗ for t = 0..T (no training): what is reported
    best_step: int  # argmax of selection_acc over t = 1..T
    best_state: State
    perms: Perms
    gradients: int = 0  # gradient evaluations (each pair is two)
    pairs_computed: int = 0
    cached_pairs: int = 0
    seconds: float = 0.0  # everything but the validation evaluations
    eval_seconds: float = 0.0
    log: list[dict] = field(default_factory=list)
    # the score t is chosen on, t = 0..T: accuracy on a selection split of its own (held out of the source training
    # data), so that val_acc at the chosen t is not inflated by the choice; equal to val_acc when t is chosen on the
    # validation split itself (no selection split)
    selection_acc: list[float] = field(default_factory=list)


class _Walk:
    """θ₂ᵗ = θ₂⁰ + π(θ₁ᵗ − θ₁⁰) for any step t and permutation π."""

    def __init__(self, theta1: list[State], theta2_0: State, spec: PermutationSpec):
        self.theta2_0, self.spec = theta2_0, spec
        self.deltas = [{k: th[k] - theta1[0][k] for k in th} for th in theta1]
        self.T = len(theta1) - 1

    def at(self, t: int, perms: Perms) -> State:
        moved = apply_permutation(self.spec, perms, self.deltas[t])
        return {k: self.theta2_0[k] + moved[k] for k in self.theta2_0}


class _Recorder:
    """Evaluates θ₂ᵗ (its selection score, then its validation accuracy), timing the evaluations apart from the
    transfer, and records them in the result."""

    def __init__(self, res: TransferResult, evaluate: Callable[[State], float],
                 validate: Callable[[], float] | None, on_step: Callable[[int, float, float], None] | None):
        self.res, self.evaluate, self.validate, self.on_step = res, evaluate, validate, on_step

    def __call__(self, t: int, state: State) -> float:
        t0 = time.perf_counter()
        score = self.evaluate(state)
        val = self.validate() if self.validate is not None else score
        self.res.eval_seconds += time.perf_counter() - t0
        self.res.selection_acc.append(score)
        self.res.val_acc.append(val)
        self.res.log.append({"t": t, "selection_acc": score, "val_acc": val})
        if self.on_step is not None:
            self.on_step(t, score, val)
        return score


class _GradientMatcher:
    """GMT / FGMT's update of π at step s: gradient pairs (g₂ at θ₂ᵗ, g₁ at θ₁ᵗ) on shared mini-batches, then weight
    matching. FGMT computes the pair of t = s − 1 and keeps every pair in a cache; GMT recomputes all t < s."""

    def __init__(self, method: str, theta1: list[State], walk: _Walk, gradient: Gradient, max_sweeps: int,
                 generator: torch.Generator, res: TransferResult):
        self.method, self.theta1, self.walk, self.gradient = method, theta1, walk, gradient
        self.max_sweeps, self.generator, self.res = max_sweeps, generator, res
        self.batch_id = 0
        self.cache: list[tuple[State, State]] = []

    def update(self, s: int, perms: Perms) -> Perms:
        if self.method not in ("gmt", "fgmt"):
            return perms  # naive and oracle keep their π
        todo = list(range(s)) if self.method == "gmt" else [s - 1]
        fresh = [self._pair(t, perms) for t in todo]
        self.res.gradients += 2 * len(todo)
        self.res.pairs_computed += len(todo)
        if self.method == "fgmt":
            self.cache.extend(fresh)
            pairs = self.cache
        else:
            pairs = fresh
        return weight_matching(self.walk.spec, pairs, init=perms, max_sweeps=self.max_sweeps,
                               generator=self.generator)

    def _pair(self, t: int, perms: Perms) -> tuple[State, State]:
        # One mini-batch for both networks: the pair compares the two gradients of the same loss.
        g1 = self.gradient(self.theta1[t], self.batch_id)
        g2 = self.gradient(self.walk.at(t, perms), self.batch_id)
        self.batch_id += 1
        return g2, g1  # (a, b): π permutes the source gradient g₁ to align with g₂


def _starting_perms(method: str, spec: PermutationSpec, perms: Perms | None) -> Perms:
    if method in ("naive", "gmt", "fgmt"):
        return identity(spec)
    if method == "oracle":
        if perms is None:
            raise ValueError("oracle needs the permutation found by matching a real training of θ₂")
        return perms
    raise ValueError(f"unknown learning-transfer method {method!r}")


def learning_transfer(theta1: list[State], theta2_0: State, spec: PermutationSpec, method: str,
                      gradient: Gradient, evaluate: Callable[[State], float],
                      perms: Perms | None = None, max_sweeps: int = 100, seed: int = 0,
                      on_step: Callable[[int, float, float], None] | None = None,
                      validate: Callable[[], float] | None = None) -> TransferResult:
    """Transfer the trajectory `theta1` (θ₁⁰..θ₁ᵀ, parameters only) to `theta2_0`.

    `gradient(state, batch_id)`: the training-loss gradient at `state`; equal ids mean the same mini-batch.
    `evaluate(state)`: the score t is chosen on (accuracy on a selection split; BatchNorm statistics recomputed by
    the caller), leaving `state` in the caller's model; `validate()`: then the validation accuracy of that model,
    reported (None: the score is the validation accuracy, t chosen on the split it is reported on).
    `on_step(t, score, validation accuracy)`: after each evaluation.
    `perms`: the fixed permutation of `oracle` (ignored otherwise).
    """
    if len(theta1) < 2:
        raise ValueError("the trajectory needs θ₁⁰ and θ₁ᵀ at least")
    check_compatible(theta1[0], theta2_0)
    walk = _Walk(theta1, theta2_0, spec.restricted(theta1[0].keys()))
    perms = _starting_perms(method, walk.spec, perms)
    res = TransferResult(method, [], 0, {}, perms)
    t_start = time.perf_counter()
    record = _Recorder(res, evaluate, validate, on_step)
    matcher = _GradientMatcher(method, theta1, walk, gradient, max_sweeps, torch.Generator().manual_seed(seed), res)
    record(0, dict(theta2_0))
    best_acc = -1.0  # the best step is chosen among t >= 1 (t = 0 is θ₂⁰ itself)
    for s in range(1, walk.T + 1):
        perms = matcher.update(s, perms)
        state = walk.at(s, perms)
        acc = record(s, state)
        if acc > best_acc:
            best_acc, res.best_step, res.best_state = acc, s, state
    res.perms = perms
    res.cached_pairs = len(matcher.cache)
    res.seconds = time.perf_counter() - t_start - res.eval_seconds
    return res
