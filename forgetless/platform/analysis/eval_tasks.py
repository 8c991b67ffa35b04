"""Forgetting of the eval tasks (general-ability suites): tasks never trained, so their forgetting is the drop from
row 0 of R (the model before any target training) to the latest row. Pure functions over the rows a run records
(`RunState.eval_rows`: one {suite: {metric: value}} per row of R)."""
from __future__ import annotations

import math

HIGHER_IS_BETTER = ("acc", "acc_norm")  # every suite's scores; a held-out corpus' loss and perplexity: lower is better


def eval_task_forgetting(rows: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    """For every suite: `eval/<name>/forgetting` = acc of row 0 − acc of the last row (positive = forgotten; the
    multiple-choice suites' length-normalised acc too, as `forgetting_norm`), and for a held-out corpus, as for every
    corpus (docs/metrics.md: losses subtract, perplexities divide), `eval/<name>/loss_increase` = its mean token loss
    now − before any target training (nats) and `eval/<name>/perplexity_ratio` = exp(that increase)."""
    if not rows:
        return {}
    first, last = rows[0], rows[-1]
    out: dict[str, float] = {}
    for name, now in last.items():
        before = first.get(name, {})
        if "acc" in now and "acc" in before:
            out[f"eval/{name}/forgetting"] = before["acc"] - now["acc"]
        if "acc_norm" in now and "acc_norm" in before:
            out[f"eval/{name}/forgetting_norm"] = before["acc_norm"] - now["acc_norm"]
        if "loss" in now and "loss" in before and math.isfinite(before["loss"]):
            out[f"eval/{name}/loss_increase"] = now["loss"] - before["loss"]
            out[f"eval/{name}/perplexity_ratio"] = math.exp(now["loss"] - before["loss"])
    return out


def eval_columns(results: list) -> list[tuple[str, str, bool]]:
    """The comparison table's columns for the eval tasks: each suite's forgetting in points (results.table_columns
    format: header, metric key, shown as a percentage), in the order the results name them."""
    keys = dict.fromkeys(k for r in results for k in r.metrics if k.startswith("eval/") and k.endswith("/forgetting"))
    return [(f"{k.split('/')[1]} forgetting pp", k, True) for k in keys]
