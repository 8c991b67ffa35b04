"""Figures for MLflow: the accuracy-matrix heatmap and learning / forgetting curves (matplotlib, headless), and a
search's target accuracy vs stop point and stop point x learning rate heatmap."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def accuracy_matrix_heatmap(R: np.ndarray, task_names: Sequence[str], title: str, path: Path) -> Path:
    """R as the change from row 0 (the pre-trained model) in percentage points, on a diverging scale centred on 0, so a
    few points of forgetting show in colour; the cells print the accuracies themselves."""
    R = np.asarray(R, dtype=float)
    change = 100.0 * (R - R[0])
    span = max(1.0, float(np.nanmax(np.abs(change))))
    fig, ax = plt.subplots(figsize=(1.2 * len(task_names) + 2.5, 0.9 * R.shape[0] + 1.8))
    im = ax.imshow(change, vmin=-span, vmax=span, cmap="RdBu")
    ax.set_xticks(range(len(task_names)), [f"{n}\n({'source' if j == 0 else f'target {j}'})"
                                           for j, n in enumerate(task_names)], fontsize=8)
    ax.set_yticks(range(R.shape[0]), ["before (pre-trained)"] + [f"after {task_names[i]}" for i in range(1, R.shape[0])],
                  fontsize=8)
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training stage i")
    for i in range(R.shape[0]):
        for j in range(R.shape[1]):
            note = "" if i == 0 else f"\n({change[i, j]:+.1f})"
            ax.text(j, i, f"{R[i, j]:.3f}{note}", ha="center", va="center", fontsize=8,
                    color="w" if abs(change[i, j]) > 0.6 * span else "k")
    fig.colorbar(im, ax=ax, label="change from row 0 (percentage points)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def phase_switches(phase_log: Sequence[dict]) -> list[tuple[int, str]]:
    """(step, "probe -> finetune") where a phase hands over to the next phase of the same stage (e.g. lp_ft)."""
    return [(a["end_step"], f"{a['phase']} -> {b['phase']}") for a, b in zip(phase_log, phase_log[1:])
            if a["stage"] == b["stage"] and "end_step" in a]


def _mark_switches(ax, switches: Sequence[tuple[int, str]], color: str = "grey") -> None:
    for step, label in switches:
        ax.axvline(step, color=color, lw=0.9, ls="--", alpha=0.7)
        ax.annotate(label, (step, 1.0), xycoords=("data", "axes fraction"), fontsize=7, color=color, rotation=90,
                    ha="right", va="top")


def learning_curves(history: list[dict], task_names: Sequence[str], title: str, path: Path,
                    phases: Sequence[dict] = ()) -> Path:
    """Validation accuracy of every task vs optimizer steps; the source's decline is the forgetting curve."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [h["step"] for h in history]
    for j, name in enumerate(task_names):
        vals = [h["acc"].get(str(j)) for h in history]
        label = f"{name} ({'source' if j == 0 else f'target {j}'})"
        ax.plot(steps, vals, marker=".", lw=1.5, ls="--" if j == 0 else "-", label=label)
    boundaries = sorted({h["step"] for h, nxt in zip(history, history[1:]) if nxt["stage"] != h["stage"]})
    for b in boundaries:
        ax.axvline(b, color="grey", lw=0.8, ls=":")
    _mark_switches(ax, phase_switches(phases))
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def comparison_curves(runs: dict[str, list[dict]], path: Path, title: str,
                      phases: dict[str, Sequence[dict]] | None = None) -> Path:
    """Target (first target) validation accuracy and the source's change from its start, one line per strategy.

    The forgetting panel plots percentage points lost on a y-axis fitted to the data: a drop of a few points is the
    finding, and a 0-1 axis would flatten it. Dashed lines mark a strategy's switch between phases (lp_ft)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, history) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        steps = [h["step"] for h in history]
        a1.plot(steps, [h["acc"].get("1") for h in history], marker=".", label=label, color=color)
        start = history[0]["acc"]["0"] if history else 0.0
        a2.plot(steps, [100.0 * (h["acc"]["0"] - start) for h in history], marker=".", label=label, color=color)
        for ax in (a1, a2):
            _mark_switches(ax, [(s, f"{label}: {t}") for s, t in phase_switches((phases or {}).get(label, ()))],
                           color)
    a1.set_title("first target: validation accuracy (learning)")
    a1.set_ylabel("validation accuracy")
    a1.set_ylim(0, 1.02)
    a2.set_title("source: change in validation accuracy (forgetting)")
    a2.set_ylabel("change from the start (percentage points)")
    a2.axhline(0.0, color="k", lw=0.8)
    for a in (a1, a2):
        a.set_xlabel("optimizer steps")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# a search's figures (forgetless tune / forgetless report)

LR_KEY = "train.lr"  # the searched field on the search figures' learning-rate axis


class TrialView(Protocol):
    """What the search figures read of one trial (a `forgetless.platform.tuning.TrialResult`; plots never
    imports tuning, so it names only the shape)."""

    params: dict[str, Any]
    status: str
    epochs: int
    objective: float
    metrics: dict[str, float]

    @property
    def stop_point(self) -> int: ...


class SearchView(Protocol):
    """What the search figures read of a search (a `forgetless.platform.tuning.SearchResult`)."""

    name: str
    mode: str
    objective: str
    space_keys: list[str]
    source_acc_by_stop_point: dict[int, float]

    @property
    def trials(self) -> Sequence[TrialView]: ...


def _lr_of(t: TrialView, res: SearchView) -> Any:
    return t.params.get(LR_KEY) if LR_KEY in res.space_keys else "config"


def _best_per_cell(res: SearchView, finished_only: bool) -> dict[tuple[int, Any], TrialView]:
    # Several trials can share a (stop point, lr) cell (other searched fields, repeats): show the best of them.
    sign = 1.0 if res.mode == "max" else -1.0
    cells: dict[tuple[int, Any], TrialView] = {}
    for t in res.trials:
        if (finished_only and t.status != "finished") or math.isnan(t.objective):
            continue
        key = (t.stop_point, _lr_of(t, res))
        if key not in cells or sign * t.objective > sign * cells[key].objective:
            cells[key] = t
    return cells


def plot_target_vs_stop_point(res: SearchView, path: Path) -> Path:
    """Target test accuracy vs stop point, one line per learning rate; the stop points' source accuracy on a second
    axis (the paper's picture: source accuracy keeps rising while the best starting point for the target is earlier)."""
    cells = _best_per_cell(res, finished_only=True)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    lrs = sorted({lr for _, lr in cells}, key=str)
    for lr in lrs:
        pts = sorted((sp, t.metrics.get("test/target/acc", float("nan"))) for (sp, l), t in cells.items() if l == lr)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"lr={lr:g}" if isinstance(lr, float)
                else f"lr={lr}")
    ax.set_xlabel("pre-training stop point (epoch)")
    ax.set_ylabel("target test accuracy (finished trials)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    src = sorted(res.source_acc_by_stop_point.items())
    if src:
        ax2.plot([s[0] for s in src], [s[1] for s in src], color="grey", ls="--", marker=".",
                 label="source val acc of the stop point")
        ax2.set_ylabel("source validation accuracy", color="grey")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
    ax.set_title(f"{res.name}: target accuracy vs stop point")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmap(res: SearchView, path: Path) -> Path:
    """Objective (validation) of every stop point x learning rate cell; early-stopped trials are marked."""
    cells = _best_per_cell(res, finished_only=False)
    sps = sorted({sp for sp, _ in cells})
    lrs = sorted({lr for _, lr in cells}, key=lambda v: (isinstance(v, str), v if not isinstance(v, str) else 0))
    grid = np.full((len(lrs), len(sps)), np.nan)
    for (sp, lr), t in cells.items():
        grid[lrs.index(lr), sps.index(sp)] = t.objective
    fig, ax = plt.subplots(figsize=(1.0 * len(sps) + 3, 0.7 * len(lrs) + 2))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(sps)), [str(s) for s in sps])
    ax.set_yticks(range(len(lrs)), [f"{lr:g}" if isinstance(lr, float) else str(lr) for lr in lrs])
    ax.set_xlabel("pre-training stop point (epoch)")
    ax.set_ylabel("learning rate")
    for (sp, lr), t in cells.items():
        txt = f"{t.objective:.3f}" + ("" if t.status == "finished" else f"\nstop@{t.epochs}")
        ax.text(sps.index(sp), lrs.index(lr), txt, ha="center", va="center", fontsize=7,
                color="w" if np.nanmean(grid) > t.objective else "k")
    fig.colorbar(im, ax=ax, label=f"objective ({res.objective})")
    ax.set_title(f"{res.name}: stop point x learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# a trade-off: every point, its Pareto front drawn (forgetless tune; the front itself is analysis.pareto's)


def _axis_label(metric: str, direction: str, split: str) -> str:
    return f"{metric} % ({split}; {'higher' if direction == 'max' else 'lower'} is better)"


def plot_pareto_front(title: str, axes: Sequence[tuple[str, str]], points: Sequence[Sequence[float]],
                      on_front: Sequence[bool], labels: Sequence[str], path: Path,
                      reported: Sequence[Sequence[float] | None] | None = None,
                      splits: tuple[str, str] = ("validation", "test")) -> Path:
    """Every point (fractions, shown in %) on the first two of `axes` ((metric, max|min) pairs), the front's points
    joined and labelled. `reported`: for front points, the same metrics on the report split, drawn hollow and tied
    to the point they were chosen as (selection on `splits[0]`, report on `splits[1]`)."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xy = np.array([[100 * float(p[0]), 100 * float(p[1])] for p in points], dtype=float).reshape(-1, 2)
    front = [i for i, on in enumerate(on_front) if on]
    others = [i for i, on in enumerate(on_front) if not on]
    ax.scatter(xy[others, 0], xy[others, 1], color="0.6", s=28, label=f"dominated ({len(others)})", zorder=2)
    order = sorted(front, key=lambda i: xy[i, 0])
    ax.plot(xy[order, 0], xy[order, 1], color="tab:red", marker="o", lw=1.5, ms=7,
            label=f"Pareto front, {splits[0]} ({len(front)})", zorder=3)
    for i in front:
        ax.annotate(labels[i], (xy[i, 0], xy[i, 1]), textcoords="offset points", xytext=(5, 5), fontsize=7)
        test = (reported or [None] * len(points))[i]
        if test is not None and all(v is not None and not math.isnan(v) for v in test[:2]):
            tx, ty = 100 * float(test[0]), 100 * float(test[1])
            ax.plot([xy[i, 0], tx], [xy[i, 1], ty], color="tab:blue", ls=":", lw=0.8, zorder=1)
            ax.scatter([tx], [ty], facecolors="none", edgecolors="tab:blue", s=40, zorder=3)
    if reported is not None:
        ax.scatter([], [], facecolors="none", edgecolors="tab:blue", s=40, label=f"front points on {splits[1]}")
    (mx, dx), (my, dy) = axes[0], axes[1]
    ax.set_xlabel(_axis_label(mx, dx, splits[0]))
    ax.set_ylabel(_axis_label(my, dy, splits[0]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title + ("" if len(axes) == 2 else f" (first 2 of {len(axes)} objectives)"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
