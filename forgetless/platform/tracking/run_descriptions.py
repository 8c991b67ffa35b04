"""What a reviewer reads in the MLflow UI: run and experiment descriptions, run context (source, git commit, user),
the datasets a run used, system metrics, and the link `forgetless compare` prints.

The UI shows `mlflow.note.content` (markdown) as a run's or an experiment's description, and opens an experiment whose
`mlflow.experimentKind` is `custom_model_development` in its model-training view (not the GenAI overview).
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.analysis import paired as paired_stats
from forgetless.platform.analysis.results import CompareResult, StrategyResult

NOTE_TAG = "mlflow.note.content"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
SYSTEM_METRICS_INTERVAL_S = 5  # seconds between samples: a minute-long run still gets a dozen points
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store


# ---------------------------------------------------------------------------------------------------------------------
# links and descriptions (plain text, no MLflow calls)


def run_path(experiment_id: str, run_id: str) -> str:
    """The UI route of a run in the model-training view (a hash route: it works as a relative markdown link too)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def ui_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The link to print: the parent run's page (its description holds the comparison), on the tracking server
    itself, or on `mlflow ui`'s default address for a local store."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else DEFAULT_UI
    return f"{base}/{run_path(experiment_id, run_id)}"


def _pp(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{100 * v:.1f}"


def findings(results: Sequence[StrategyResult]) -> list[str]:
    """One sentence per finding: who forgot most (and least), who reached the learning-speed threshold first, who
    ended with the best target accuracy."""
    out = []
    most = max(results, key=lambda r: r.metrics["source/forgetting"])
    least = min(results, key=lambda r: r.metrics["source/forgetting"])
    out.append(f"**{most.label}** forgot most: the source fell {_pp(most.metrics['source/forgetting'])} points "
               f"(from {_pp(most.metrics['source/acc_before'])}% to {_pp(most.metrics['source/acc_after'])}%)"
               + (f"; **{least.label}** forgot least ({_pp(least.metrics['source/forgetting'])} points)."
                  if least is not most else "."))
    reached = [r for r in results if not math.isnan(r.metrics["steps_to/90"])]
    if reached:
        fastest = min(reached, key=lambda r: r.metrics["steps_to/90"])
        out.append(f"**{fastest.label}** learned fastest: its target validation accuracy reached 90% of the best any "
                   f"strategy reached after {fastest.metrics['steps_to/90']:.0f} optimizer steps.")
    else:
        out.append("No strategy reached 90% of the best target accuracy.")
    best = max(results, key=lambda r: r.metrics["acc"])
    out.append(f"**{best.label}** ended with the best target accuracy (ACC): {_pp(best.metrics['acc'])}% "
               f"(test split).")
    return out


def parent_description(out: CompareResult) -> str:
    """The parent run's description: findings, the comparison table, links to the child runs and the report."""
    lines = [f"### {out.name}: {len(out.results)} strategies compared on "
             f"{' → '.join(out.results[0].task_names)}", ""]
    lines += [f"- {s}" for s in findings(out.results)]
    several = len(out.seeds) > 1
    if several:
        lines += ["", f"Mean ± sd over seeds {', '.join(map(str, out.seeds))} (n runs each; per-seed runs below; "
                      f"the aggregates are the parent's metrics `<strategy>/<metric>/mean` and `.../sd`):", "",
                  "```", out.table(), "```"]
    lines += ["", "| strategy | ACC % | source before % | source after % | source forgetting pp | BWT pp | "
                  "steps to 90% | wall s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in out.results:
        m = r.metrics
        label = r.run_label(several)
        name = f"[{label}]({run_path(out.experiment_id, r.mlflow_run_id)})" if r.mlflow_run_id else label
        steps = "-" if math.isnan(m["steps_to/90"]) else f"{m['steps_to/90']:.0f}"
        lines.append(f"| {name} | {_pp(m['acc'])} | {_pp(m['source/acc_before'])} | "
                     f"{_pp(m['source/acc_after'])} | {_pp(m['source/forgetting'])} | {_pp(m.get('bwt'))} | "
                     f"{steps} | {r.wall_seconds:.0f} |")
    lines += ["", "Accuracies are on the test split (the accuracy matrix R); *ACC* = mean target accuracy after the "
                  "last stage, *BWT* = mean change of the earlier targets (Lopez-Paz & Ranzato 2017; - with one "
                  "target), *source forgetting* = the source accuracy lost from its best (Chaudhry et al. 2018), "
                  "*steps to 90%* = optimizer steps until the target's validation accuracy first "
                  "reached 90% of the best any strategy reached (docs/metrics.md). Charts: one bar per strategy for "
                  "every summary metric (`source/forgetting_pp`, `steps_to/90`, ...). Curves, heatmaps and the "
                  "learning-vs-forgetting scatter: the artifact `comparison_report.html` (opens offline)."]
    return "\n".join(lines + protocol_lines(out))


SPLIT_NOTE = ("Selection (stop rules, early stopping, trajectory steps) on validation data; every reported "
              "accuracy on the test split.")


def protocol_lines(out: CompareResult) -> list[str]:
    """The protocol's part of the parent's description (docs/protocol.md): the splits, each strategy's optimizer
    steps, the learning-vs-forgetting front and, with several seeds, the paired differences from the reference."""
    several = len(out.seeds) > 1
    records = out.records()
    front = [lb for lb in out.labels() if next(r["pareto"] for r in records if r["label"] == lb)]
    steps = {lb: sorted({int(r.global_step) for r in out.runs(lb)}) for lb in out.labels()}
    lines = ["", f"**Protocol.** {SPLIT_NOTE} Optimizer steps over all phases: "
             + ", ".join(f"{lb} {'/'.join(map(str, s))}" for lb, s in steps.items()) + ".",
             "", f"**Pareto front** of ACC (higher) vs source forgetting (lower)"
             + (" on the means over seeds" if several else "") + ": "
             + ", ".join(f"**{lb}**" for lb in front) + " (no other strategy is better on both)."]
    diffs = out.paired()
    if diffs:
        lines += ["", paired_stats.paired_caption(out.reference_label()), "",
                  "| " + " | ".join(paired_stats.PAIRED_HEADERS) + " |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
        lines += ["| " + " | ".join(paired_stats.paired_row(d)) + " |" for d in diffs]
    return lines


def strategy_summary(strategy_doc: str | None) -> str:
    """The first sentence of a strategy module's docstring (`finetune: new head, every parameter trains; ...`)."""
    return (strategy_doc or "").strip().split("\n")[0]


def child_description(r: StrategyResult, strategy_doc: str | None) -> str:
    m = r.metrics
    steps = "never reached" if math.isnan(m["steps_to/90"]) else f"{m['steps_to/90']:.0f} steps"
    return (f"**{r.label}** ({strategy_summary(strategy_doc)})\n\n"
            f"ACC {_pp(m['acc'])}% (test); source {_pp(m['source/acc_before'])}% → "
            f"{_pp(m['source/acc_after'])}% (source forgetting {_pp(m['source/forgetting'])} pp); 90% of the best "
            f"target accuracy: {steps}; {m['optimizer_steps']:.0f} optimizer steps, {r.wall_seconds:.0f} s. "
            + SPLIT_NOTE)


def experiment_description(name: str, experiment_id: str, parent_run_id: str) -> str:
    return (f"forgetless runs of **{name}**: each `forgetless compare` is a parent run whose description holds the "
            f"comparison table and findings (latest: [{parent_run_id}]({run_path(experiment_id, parent_run_id)})); "
            f"its child runs are the pre-training and one run per strategy, with summary metrics at step 0 (one "
            f"bar per strategy), `val/...` and `test/...` curves, the accuracy matrix and the model.")


# ---------------------------------------------------------------------------------------------------------------------
# MLflow calls


def set_description(uri: str, run_id: str, markdown: str) -> None:
    tracking.client(uri).set_tag(run_id, NOTE_TAG, markdown)


def set_model_training_view(uri: str, experiment_id: str, description: str | None = None) -> None:
    """Open the experiment in MLflow's model-training view; optionally set its description."""
    c = tracking.client(uri)
    c.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    if description is not None:
        c.set_experiment_tag(experiment_id, NOTE_TAG, description)


def context_tags() -> dict[str, str]:
    """Source, source type, user and git commit of this invocation, as MLflow's fluent API would set them (runs
    created through MlflowClient get none by themselves). The commit is the checkout forgetless runs from."""
    # deferred: mlflow is a 2 s import that only the processes that log need
    from mlflow.tracking.context.registry import resolve_tags

    tags = dict(resolve_tags({}))
    tags["mlflow.source.name"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500] or "forgetless"
    commit = _git_commit(Path(__file__).resolve().parent)
    if commit and "mlflow.source.git.commit" not in tags:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    c = tracking.client(uri)
    for k, v in tracking.redact(tags).items():
        c.set_tag(run_id, k, v)


def log_task_datasets(uri: str, run_id: str, tasks: Sequence[Any]) -> None:
    """Every task's train/val/test split as an MLflow dataset input (name, digest, sizes; the context says the
    split, the source the dataset and class split). `tasks`: forgetless.data.TaskData."""
    # deferred: mlflow is a 2 s import that only world rank 0 needs
    import mlflow.data
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for j, task in enumerate(tasks):
        role = "source" if j == 0 else f"target {j}"
        for split in ("train", "val", "test"):
            x, y = task.split(split)
            source = CodeDatasetSource({"forgetless.task": task.name, "role": role,
                                        "classes": ",".join(str(c) for c in task.classes), "split": split,
                                        "samples": str(len(y))})
            ds = mlflow.data.from_numpy(x.numpy(), targets=y.numpy(), source=source, name=f"{task.name} ({split})")
            entity = Dataset(**{k: v for k, v in ds.to_dict().items() if k in DATASET_FIELDS})  # (public to_dict)
            inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", split)]))
    tracking.client(uri).log_inputs(run_id, datasets=inputs)


# The fields of an MLflow dataset entity, as a dataset's public `to_dict()` gives them
DATASET_FIELDS = ("name", "digest", "source_type", "source", "schema", "profile")


def start_system_metrics(uri: str, run_id: str):
    """Sample CPU, memory, disk, network (and GPU where present) into the run's `system/...` metrics from a daemon
    thread of this process, until the process ends (Ray Train ends its workers when the run ends). One sample now, at
    step 0: MLflow's loop logs only after a full interval (a resumed run has its step 0 already: tracking.log_metrics
    skips it). MLflow's monitor is an internal: _compat/mlflow.py."""
    # deferred: mlflow is a 2 s import that only world rank 0 needs
    from forgetless._compat import mlflow as compat_mlflow

    return compat_mlflow.start_system_metrics(uri, run_id, SYSTEM_METRICS_INTERVAL_S,
                                              lambda metrics, step: tracking.log_metrics(uri, run_id, metrics, step))
