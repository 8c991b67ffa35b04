"""Paired statistics over seeds: each strategy's difference from a reference strategy, seed by seed.

Every seed pre-trains its own backbone and runs every strategy from it, so the runs of one seed share their starting
point and data order: a claim such as "A forgets less than B" is about the per-seed differences A − B, not about two
means read side by side. For each strategy and headline metric this gives the differences' mean ± sample sd, n (the
seeds both runs have a value for), a two-sided paired t-test p-value (scipy.stats.ttest_rel: H0 mean difference 0) and
a bootstrap 95% percentile interval of the mean difference. Pure functions of numbers (docs/protocol.md).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

# the headline metrics compared (StrategyResult.metrics keys, fractions), with the direction that is better; a metric
# that no run defines (BWT with a single target) is left out
HEADLINE_METRICS: list[tuple[str, str]] = [("acc", "higher"), ("source/forgetting", "lower"), ("bwt", "higher")]
BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedDifference:
    """One strategy minus the reference on one metric, over the seeds both have (in the metric's own units)."""

    label: str
    reference: str
    metric: str
    better: str  # "higher" or "lower": which sign of the difference favours `label`
    n: int
    mean: float
    sd: float  # sample sd (n - 1) of the per-seed differences; nan below 2
    p_value: float  # two-sided paired t-test; nan below 2 pairs or when every difference is 0
    ci_low: float  # bootstrap 95% percentile interval of the mean difference
    ci_high: float
    seeds: tuple[int, ...]

    def to_dict(self) -> dict:
        return {**asdict(self), "seeds": list(self.seeds)}


def paired_t_pvalue(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test of mean(a - b) = 0. Differences that are all equal and not zero have
    sd 0 and t = ±inf: p = 0. All zero (or fewer than 2 pairs): nan, nothing to test. (Equal up to float noise:
    0.25 - 0.30 and 0.15 - 0.20 differ in the 17th digit.)"""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    tiny = 1e-12 * max(1.0, float(np.abs(d).max(initial=0.0)))  # float noise, not a spread of the differences
    if d.size < 2 or np.all(np.abs(d) <= tiny):
        return math.nan
    if np.ptp(d) <= tiny:
        return 0.0
    return float(stats.ttest_rel(a, b).pvalue)


def bootstrap_interval(differences: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                       confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `differences`: the seeds are resampled with replacement
    `resamples` times (a fixed generator seed, so the same data give the same interval). With few seeds it is
    narrow-biased (a 3-seed resample has at most 10 distinct means): read it with n and the t-test."""
    d = np.asarray(differences, dtype=float)
    if d.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _by_seed(records: Sequence[Mapping], label: str, metric: str) -> dict[int, float]:
    out = {}
    for r in records:
        v = r.get(metric)
        if r["label"] == label and isinstance(v, (int, float)) and not math.isnan(v):
            out[int(r["seed"])] = float(v)
    return out


def paired_difference(records: Sequence[Mapping], label: str, reference: str, metric: str,
                      better: str = "higher") -> PairedDifference | None:
    """`label` − `reference` on `metric`, paired by seed (records: label, seed, metric values); None when no seed has
    both."""
    mine, ref = _by_seed(records, label, metric), _by_seed(records, reference, metric)
    seeds = tuple(sorted(set(mine) & set(ref)))
    if not seeds:
        return None
    a, b = [mine[s] for s in seeds], [ref[s] for s in seeds]
    d = np.subtract(a, b)
    low, high = bootstrap_interval(d)
    return PairedDifference(label, reference, metric, better, len(seeds), float(d.mean()),
                            float(d.std(ddof=1)) if len(d) > 1 else math.nan, paired_t_pvalue(a, b), low, high,
                            seeds)


def paired_differences(records: Sequence[Mapping], reference: str,
                       metrics: Sequence[tuple[str, str]] = HEADLINE_METRICS) -> list[PairedDifference]:
    """Every other strategy − `reference` on each metric some run defines, strategies in first-seen order."""
    labels = [lb for lb in dict.fromkeys(r["label"] for r in records) if lb != reference]
    out = []
    for label in labels:
        for metric, better in metrics:
            diff = paired_difference(records, label, reference, metric, better)
            if diff is not None:
                out.append(diff)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# display

METRIC_HEADERS = {"acc": "ACC", "source/forgetting": "source forgetting", "bwt": "BWT"}
SIGNIFICANCE = 0.05


def verdict(d: PairedDifference) -> str:
    """"better" / "worse" (for `label`) when the t-test rejects a zero difference at 5% and the bootstrap interval
    excludes 0; otherwise "not shown" (no difference shown at these seeds)."""
    if math.isnan(d.p_value) or d.p_value >= SIGNIFICANCE or d.ci_low <= 0 <= d.ci_high:
        return "not shown"
    favours = d.mean > 0 if d.better == "higher" else d.mean < 0
    return "better" if favours else "worse"


def _pp(v: float, signed: bool = True) -> str:
    return "-" if math.isnan(v) else f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"


PAIRED_HEADERS = ["strategy", "metric", "n", "Δ pp (mean ± sd)", "95% CI (bootstrap)", "p (paired t)", "verdict"]


def paired_row(d: PairedDifference) -> list[str]:
    """One difference as the cells under PAIRED_HEADERS."""
    return [d.label, METRIC_HEADERS.get(d.metric, d.metric), str(d.n),
            _pp(d.mean) + ("" if math.isnan(d.sd) else f" ± {_pp(d.sd, signed=False)}"),
            f"[{_pp(d.ci_low)}, {_pp(d.ci_high)}]", "-" if math.isnan(d.p_value) else f"{d.p_value:.3g}", verdict(d)]


def format_paired_table(diffs: Sequence[PairedDifference]) -> str:
    """One row per strategy and metric: n, the mean ± sd of the per-seed differences (percentage points), the
    bootstrap 95% interval, the paired t-test p-value and the verdict."""
    if not diffs:
        return ""
    headers, rows = PAIRED_HEADERS, [paired_row(d) for d in diffs]
    widths = [max(len(x) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def paired_caption(reference: str) -> str:
    return (f"Paired differences from {reference} over seeds (strategy − {reference}, seed by seed; test split; "
            f"higher ACC/BWT and lower source forgetting are better; p: two-sided paired t-test; 95% CI: bootstrap "
            f"of the mean difference):")


def paired_metrics(diffs: Sequence[PairedDifference]) -> dict[str, float]:
    """The differences as the parent run's MLflow metrics: `<label>/vs_<reference>/<metric>/diff_pp_mean`, `.../
    diff_pp_sd`, `.../ci95_low_pp`, `.../ci95_high_pp` (percentage points), `.../p_value` and `.../n`; undefined
    (nan) values left out."""
    out: dict[str, float] = {}
    for d in diffs:
        prefix = f"{d.label}/vs_{d.reference}/{d.metric}"
        values = {"diff_pp_mean": 100 * d.mean, "diff_pp_sd": 100 * d.sd, "ci95_low_pp": 100 * d.ci_low,
                  "ci95_high_pp": 100 * d.ci_high, "p_value": d.p_value, "n": float(d.n)}
        out.update({f"{prefix}/{k}": v for k, v in values.items() if not math.isnan(v)})
    return out
