"""Forgetting and learning-speed metrics: small pure functions over an accuracy matrix and learning curves.

Conventions (documented in the README):
- The stream is tasks 0..T where task 0 is the **source** task the backbone was pre-trained on and 1..T the targets.
- R has shape (T+1, T+1): R[i][j] = test accuracy on task j after training stage i. Row 0 is the pre-trained backbone
  before any target training (so R[0][j] for j >= 1 is b_j: the backbone with a fresh, untrained head for task j).
- Treating the source as task 0 makes its loss part of BWT and forgetting: with one target (T = 1),
  forgetting = R[0][0] - R[1][0] is exactly the source accuracy lost.
- Causal-LM streams: R holds next-token accuracy (higher is better), so every metric above applies unchanged; the test
  mean token losses form a second matrix L of the same shape (nats, lower is better), and perplexity = exp(L).
  With `score: token_probability` R holds exp(-L) instead (`score_matrix`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _as_matrix(R: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    m = np.asarray(R, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        raise ValueError(f"accuracy matrix must be square with at least 2 rows (source + 1 target), got {m.shape}")
    return m


def final_accuracy(R) -> float:
    """ACC = mean_j R[T][j] over all tasks (source included)."""
    m = _as_matrix(R)
    return float(m[-1].mean())


def average_incremental_accuracy(R) -> float:
    """mean_i mean_{j<=i} R[i][j]: the average accuracy on the tasks seen so far, over all stages."""
    m = _as_matrix(R)
    return float(np.mean([m[i, : i + 1].mean() for i in range(m.shape[0])]))


def backward_transfer(R) -> float:
    """BWT = mean_{j<T} (R[T][j] - R[j][j]) (Lopez-Paz & Ranzato 2017). Negative = forgetting."""
    m = _as_matrix(R)
    T = m.shape[0] - 1
    return float(np.mean([m[T, j] - m[j, j] for j in range(T)]))


def forward_transfer(R) -> float:
    """FWT = mean_{j>=2} (R[j-1][j] - b_j) with b_j = R[0][j] (Lopez-Paz & Ranzato 2017).

    NaN when there are fewer than two targets (the sum is empty).
    """
    m = _as_matrix(R)
    T = m.shape[0] - 1
    vals = [m[j - 1, j] - m[0, j] for j in range(2, T + 1)]
    return float(np.mean(vals)) if vals else float("nan")


def forgetting_max(R) -> float:
    """Chaudhry et al. 2018: mean_{j<T} ( max_{j<=l<T} R[l][j] - R[T][j] ), the drop from each task's best."""
    m = _as_matrix(R)
    T = m.shape[0] - 1
    return float(np.mean([m[j:T, j].max() - m[T, j] for j in range(T)]))


def forgetting_first(R) -> float:
    """Avalanche's definition: mean_{j<T} ( R[j][j] - R[T][j] ), the drop from just after learning the task."""
    m = _as_matrix(R)
    T = m.shape[0] - 1
    return float(np.mean([m[j, j] - m[T, j] for j in range(T)]))


def source_retention(R) -> float:
    """Source accuracy after the last stage divided by before any target training."""
    m = _as_matrix(R)
    return float(m[-1, 0] / m[0, 0]) if m[0, 0] > 0 else float("nan")


def steps_to_threshold(steps: Sequence[int], accuracies: Sequence[float], threshold: float) -> int | None:
    """Optimizer steps at the first evaluation whose accuracy reaches `threshold`; None if never reached."""
    if len(steps) != len(accuracies):
        raise ValueError("steps and accuracies must have the same length")
    for s, a in zip(steps, accuracies):
        if a >= threshold:
            return int(s)
    return None


def area_under_curve(steps: Sequence[int], values: Sequence[float]) -> float:
    """Normalised area under a curve sampled at `steps` (trapezoids / step span), i.e. its mean height in [0, 1].

    A single point returns its value. Used for the area under the target learning curve and the source curve.
    """
    if len(steps) != len(values):
        raise ValueError("steps and values must have the same length")
    if not values:
        return float("nan")
    s = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    if len(v) == 1 or s[-1] == s[0]:
        return float(v.mean())
    return float(np.sum((v[1:] + v[:-1]) / 2.0 * np.diff(s)) / (s[-1] - s[0]))


def perplexity(mean_token_loss: float) -> float:
    """exp(mean token cross-entropy in nats): lower is better; 1 = always right with certainty, V = uniform guessing
    over a V-token vocabulary. inf instead of an overflow (a diverged model)."""
    return float(np.exp(mean_token_loss)) if mean_token_loss < 700 else float("inf")


SCORES = ("accuracy", "token_probability")


def score_matrix(accuracy, losses, score: str) -> np.ndarray:
    """The matrix R of the score a config names, from the test accuracies and mean losses (same shape):
    `accuracy` as is; `token_probability` = exp(-loss), the geometric-mean probability the model gives the right
    token (or class), i.e. 1/perplexity: in (0, 1], higher is better, so every R metric reads the same way."""
    if score == "accuracy":
        return np.asarray(accuracy, dtype=float)
    if score == "token_probability":
        return np.exp(-np.asarray(losses, dtype=float))
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")


def perplexity_increase(L) -> float:
    """Forgetting in perplexity: mean_{j<T} (exp L[T][j] - exp L[j][j]), how much the perplexity of every earlier corpus
    (the source included, j = 0: the pre-trained model) rose by the end of the stream. Higher = more forgetting;
    negative = the earlier corpora got easier. L: test mean token losses, shaped like R."""
    m = _as_matrix(L)
    T = m.shape[0] - 1
    return float(np.mean([perplexity(m[T, j]) - perplexity(m[j, j]) for j in range(T)]))


def perplexity_increase_ratio(L) -> float:
    """The same as a factor: mean_{j<T} exp(L[T][j] - L[j][j]) (1 = unchanged, 2 = twice as perplexed)."""
    m = _as_matrix(L)
    T = m.shape[0] - 1
    return float(np.mean([np.exp(m[T, j] - m[j, j]) for j in range(T)]))


def summarize_losses(L) -> dict[str, float]:
    """Loss-matrix metrics of a causal-LM stream (lower is better for every perplexity)."""
    m = _as_matrix(L)
    return {
        "forgetting/perplexity_increase": perplexity_increase(m),
        "forgetting/perplexity_ratio": perplexity_increase_ratio(m),
        "source/perplexity_before": perplexity(m[0, 0]),
        "source/perplexity_after": perplexity(m[-1, 0]),
        "target/final_perplexity": float(np.mean([perplexity(v) for v in m[-1, 1:]])),
    }


def summarize(R) -> dict[str, float]:
    """Every matrix-derived metric that measures something, as fractions (results.SUMMARY_METRICS names them in MLflow).

    FWT is left out: R[j-1][j] and b_j = R[0][j] are both scored by task j's head before task j trains, and every
    forgetless strategy gives a task a fresh head, so their difference is chance-level noise (`forward_transfer` stays
    for streams whose heads are shared).
    """
    return {
        "acc": final_accuracy(R),
        "avg_inc_acc": average_incremental_accuracy(R),
        "bwt": backward_transfer(R),
        "forgetting/max": forgetting_max(R),
        "forgetting/first": forgetting_first(R),
        "source/retention": source_retention(R),
        "source/acc_before": float(_as_matrix(R)[0, 0]),
        "source/acc_after": float(_as_matrix(R)[-1, 0]),
        "target/final_acc": float(np.mean(_as_matrix(R)[-1, 1:])),
    }
