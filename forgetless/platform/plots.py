"""Figures for MLflow: the accuracy-matrix heatmap and learning / forgetting curves (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def accuracy_matrix_heatmap(R: np.ndarray, task_names: Sequence[str], title: str, path: Path) -> Path:
    R = np.asarray(R, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 * len(task_names) + 2.5, 0.9 * R.shape[0] + 1.8))
    im = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(task_names)), [f"{n}\n({'source' if j == 0 else f'target {j}'})"
                                           for j, n in enumerate(task_names)], fontsize=8)
    ax.set_yticks(range(R.shape[0]), ["before (pre-trained)"] + [f"after {task_names[i]}" for i in range(1, R.shape[0])],
                  fontsize=8)
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training stage i")
    for i in range(R.shape[0]):
        for j in range(R.shape[1]):
            ax.text(j, i, f"{R[i, j]:.3f}", ha="center", va="center", color="w" if R[i, j] < 0.6 else "k", fontsize=8)
    fig.colorbar(im, ax=ax, label="test accuracy")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def learning_curves(history: list[dict], task_names: Sequence[str], title: str, path: Path) -> Path:
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


def comparison_curves(runs: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Target (first target) and source validation accuracy vs steps, one line per strategy, side by side."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=False)
    for label, history in runs.items():
        steps = [h["step"] for h in history]
        a1.plot(steps, [h["acc"].get("1") for h in history], marker=".", label=label)
        a2.plot(steps, [h["acc"].get("0") for h in history], marker=".", label=label)
    a1.set_title("first target: validation accuracy (learning)")
    a2.set_title("source: validation accuracy (forgetting)")
    for a in (a1, a2):
        a.set_xlabel("optimizer steps")
        a.set_ylim(0, 1.02)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
