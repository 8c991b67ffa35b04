"""Forgetting and learning-speed metrics: small pure functions over an accuracy matrix and learning curves.

Conventions (docs/metrics.md defines every metric with its formula and citation):
- The stream is tasks 0..T where task 0 is the **source** task the backbone was pre-trained on and 1..T the targets.
- R has shape (T+1, T+1): R[i][j] = test score on task j after training stage i. Row 0 is the pre-trained backbone
  before any target training (so R[0][j] for j >= 1 is b_j: the backbone with a fresh, untrained head for task j).
- The standard continual-learning metrics (ACC, BWT, average incremental accuracy) average the learned tasks, the
  targets 1..T; the source's own loss has its own metrics (`source_forgetting`, `source_retention`). Chaudhry's
  forgetting averages every task learned before the last, the source included, and says so.
- Causal-LM streams: R holds next-token accuracy (higher is better), so every metric above applies unchanged; the test
  mean token losses form a second matrix L of the same shape (nats, lower is better): losses average and subtract,
  perplexities (exp of a loss) multiply. With `score: token_probability` R holds exp(-L) instead (`score_matrix`).
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
    """ACC = mean_{j=1..T} R[T][j]: the targets' score after the last stage (A_T of Chaudhry et al. 2018, ACC of
    Lopez-Paz & Ranzato 2017). The source is not one of the averaged tasks (`accuracy_with_source` counts it)."""
    m = _as_matrix(R)
    return float(m[-1, 1:].mean())


def accuracy_with_source(R) -> float:
    """mean_{j=0..T} R[T][j]: every column of the last row, the source counted as one more task (not the standard
    ACC: with one target it is half source, half target)."""
    m = _as_matrix(R)
    return float(m[-1].mean())


def average_incremental_accuracy(R) -> float:
    """mean_{i=1..T} mean_{j=1..i} R[i][j]: the mean score on the targets learned so far, averaged over the stages
    (Rebuffi et al. 2017, iCaRL's average incremental accuracy), the source not counted."""
    m = _as_matrix(R)
    T = m.shape[0] - 1
    return float(np.mean([m[i, 1 : i + 1].mean() for i in range(1, T + 1)]))


def backward_transfer(R) -> float:
    """BWT = mean_{j=1..T-1} (R[T][j] - R[j][j]) over the targets (Lopez-Paz & Ranzato 2017). Negative = forgetting.
    NaN for a single target (the sum is empty): the source's loss is `source_forgetting`."""
    m = _as_matrix(R)
    T = m.shape[0] - 1
    vals = [m[T, j] - m[j, j] for j in range(1, T)]
    return float(np.mean(vals)) if vals else float("nan")


def forward_transfer_vs_probe(R) -> float:
    """FWT = mean_{j>=2} (R[j-1][j] - b_j) with b_j = R[0][j] (Lopez-Paz & Ranzato 2017; their b_j is a random
    init, forgetless's is the pre-trained backbone with a fresh head: a probe baseline).

    NaN when there are fewer than two targets (the sum is empty).
    """
    m = _as_matrix(R)
    T = m.shape[0] - 1
    vals = [m[j - 1, j] - m[0, j] for j in range(2, T + 1)]
    return float(np.mean(vals)) if vals else float("nan")


def forgetting_max(R) -> float:
    """Forgetting (Chaudhry et al. 2018): mean_{j=0..T-1} ( max_{j<=l<T} R[l][j] - R[T][j] ), each task's drop from
    its best score, **the source (j = 0) included** (its best over rows 0..T-1). A task's rows before it trained
    (l < j: an untrained head) never count. With one target it is the source's drop, R[0][0] - R[1][0]."""
    m = _as_matrix(R)
    T = m.shape[0] - 1
    return float(np.mean([m[j:T, j].max() - m[T, j] for j in range(T)]))


def source_forgetting(R) -> float:
    """The source's drop from its best: max_{0<=l<T} R[l][0] - R[T][0] (Chaudhry's forgetting of task 0 alone)."""
    m = _as_matrix(R)
    return float(m[:-1, 0].max() - m[-1, 0])


def source_retention(R) -> float:
    """R[T][0] / R[0][0]: the source score after the last stage as a fraction of the pre-trained model's."""
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


def loss_increase(L) -> float:
    """Forgetting of a causal-LM stream in nats: mean_{j=0..T-1} (L[T][j] - L[j][j]), how much each earlier corpus'
    mean token loss rose from just after it was learned (the source, j = 0: from the pre-trained model) to the end
    of the stream, averaged over the corpora (each corpus weighs the same), **the source included**. The change in
    cross-entropy is PEFT's forgetting measure; positive = forgetting. L: test mean token losses, shaped like R."""
    m = _as_matrix(L)
    T = m.shape[0] - 1
    return float(np.mean([m[T, j] - m[j, j] for j in range(T)]))


def summarize_losses(L) -> dict[str, float]:
    """Loss-matrix metrics of a causal-LM stream (nats; lower is better for every loss and perplexity). Losses are
    averaged and subtracted; a perplexity is exp of such a loss and a perplexity ratio exp of a loss difference (never
    an arithmetic mean or difference of perplexities). L stores one mean token loss per corpus, so an aggregate over
    corpora is their mean, each corpus weighing the same, and named so (`corpus_mean`)."""
    m = _as_matrix(L)
    target_loss = float(m[-1, 1:].mean())
    forgetting = loss_increase(m)
    return {
        "source/loss_before": float(m[0, 0]),
        "source/loss_after": float(m[-1, 0]),
        "source/loss_increase": float(m[-1, 0] - m[0, 0]),
        "source/perplexity_before": perplexity(m[0, 0]),
        "source/perplexity_after": perplexity(m[-1, 0]),
        "source/perplexity_ratio": perplexity(m[-1, 0] - m[0, 0]),
        "target/corpus_mean_loss": target_loss,
        "target/corpus_mean_perplexity": perplexity(target_loss),
        "forgetting/loss_increase": forgetting,
        "forgetting/perplexity_ratio": perplexity(forgetting),
    }


def summarize(R) -> dict[str, float]:
    """Every matrix-derived metric that measures something, as fractions (results.SUMMARY_METRICS names them in MLflow).
    `bwt` is NaN (not logged, shown as "-") for a single target.

    FWT is left out: R[j-1][j] and b_j = R[0][j] are both scored by task j's head before task j trains, and every
    forgetless strategy gives a task a fresh head, so their difference is chance-level noise
    (`forward_transfer_vs_probe` stays for streams whose heads are shared).
    """
    m = _as_matrix(R)
    return {
        "acc": final_accuracy(m),
        "acc_with_source": accuracy_with_source(m),
        "avg_inc_acc": average_incremental_accuracy(m),
        "bwt": backward_transfer(m),
        "forgetting/max": forgetting_max(m),
        "source/forgetting": source_forgetting(m),
        "source/retention": source_retention(m),
        "source/acc_before": float(m[0, 0]),
        "source/acc_after": float(m[-1, 0]),
    }
