"""Task kinds: what a task's model predicts, and so how its loss and its scores are computed. The one place that knows.

- `classification`: logits (B, C), labels (B,); loss = cross-entropy; score = accuracy.
- `causal_lm`: next-token prediction over packed text blocks; logits (B, L, V), labels = the block's token ids (B, L);
  position t predicts token t+1, so a block of L tokens scores L-1 predictions. Loss = mean token cross-entropy (nats,
  lower is better; its exp is the perplexity, `platform.metrics.perplexity`); score = next-token accuracy, the fraction of
  positions whose argmax is the next token (higher is better).

Training (`strategies.training.train_step`), evaluation (`platform.evaluation`) and the strategies' own loss terms
(EWC's Fisher) call these functions with the task's kind instead of branching on task or strategy names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CLASSIFICATION = "classification"
CAUSAL_LM = "causal_lm"
TASK_KINDS = (CLASSIFICATION, CAUSAL_LM)


IGNORED = -100  # a label cross_entropy skips (its ignore_index)


def task_loss(kind: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss of a batch (a scalar, mean over samples or predicted tokens)."""
    if kind == CAUSAL_LM:
        # The labels shift, not the logits (as transformers' causal-LM loss): slicing the (B, L, V) logits copies them
        # to flatten, and its backward fills a zero (B, L, V) gradient to copy the slice into, ~3 % of a small
        # decoder's step on CPU. The last position predicts nothing (IGNORED): the mean is over the L-1 predictions.
        nxt = F.pad(y[:, 1:], (0, 1), value=IGNORED)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), nxt.reshape(-1), ignore_index=IGNORED)
    return F.cross_entropy(logits.float(), y)


def per_sample_scores(kind: str, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(correct, loss sum, count) per sample, float64: sums over ranks and batches give accuracy = correct / count and
    mean loss = loss sum / count (per token for causal_lm, per sample for classification)."""
    logits = logits.float()
    if kind == CAUSAL_LM:
        pred, nxt = logits[:, :-1], y[:, 1:]
        loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), nxt.reshape(-1), reduction="none").view(nxt.shape)
        correct = (pred.argmax(-1) == nxt).sum(1)
        count = torch.full((len(y),), nxt.shape[1], device=y.device)
        return correct.double(), loss.double().sum(1), count.double()
    loss = F.cross_entropy(logits, y, reduction="none")
    return (logits.argmax(1) == y).double(), loss.double(), torch.ones(len(y), dtype=torch.float64, device=y.device)


def sample_labels(kind: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Labels drawn from the model's own predictive distribution (the "true" Fisher): a class per sample, or for a
    language model the next token at every position (the first token of each block stays the data's)."""
    drawn = torch.distributions.Categorical(logits=logits.float()).sample()
    if kind == CAUSAL_LM:
        return torch.cat([y[:, :1], drawn[:, :-1]], dim=1)
    return drawn
