"""The trained model of a strategy as an MLflow logged model (named after the strategy, linked to its final step and
metrics, with a signature and an input example) and in the model registry (`forgetless register`).

A TransferModel's forward takes (inputs, task index); the logged model is `AllHeadsModel`, whose forward takes the
inputs only and returns every task's logits side by side, so torch.export can trace it (the `pt2` format: no pickle,
nothing executed when it is loaded) and a tensor signature describes it.
"""
from __future__ import annotations

import math
import re
import time
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from forgetless.console import say
from forgetless.errors import ConfigError
from forgetless.platform.tracking import mlflow_runs as tracking

INPUT_EXAMPLE_ROWS = 4  # > 1, so torch.export keeps the batch dimension dynamic
# Registered-model tags: the forgetting and learning metrics a reviewer compares versions by (MLflow names).
REGISTRY_TAG_METRICS = ("forgetting/max_pp", "source/forgetting_pp", "bwt_pp", "acc_pct",
                        "source/acc_before_pct", "source/acc_after_pct", "steps_to/90")
LABEL_TAG = "forgetless.label"
MODEL_ID_TAG = "forgetless.model_id"


class AllHeadsModel(nn.Module):
    """The trained model with one input: the logits of every task's head, concatenated in stream order (columns
    `offsets[j]:offsets[j + 1]` are task j's classes, listed in the model's metadata)."""

    def __init__(self, model: nn.Module, num_tasks: int):
        super().__init__()
        self.model = model
        self.num_tasks = num_tasks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model(x, j) for j in range(self.num_tasks)], dim=-1)  # classes, or a vocabulary per position


def model_name(label: str) -> str:
    """A logged model's name: the strategy's label, in the characters MLflow accepts in a name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "model"


def heads_metadata(tasks: Sequence[Any]) -> dict[str, Any]:
    """Which output columns belong to which task (`tasks`: forgetless.data.TaskData, in stream order)."""
    offsets = [0]
    for t in tasks:
        offsets.append(offsets[-1] + t.num_classes)
    return {"output": "logits of every task's head, concatenated in stream order",
            "tasks": [{"name": t.name, "role": "source" if j == 0 else f"target {j}", "columns": [offsets[j],
                       offsets[j + 1]], "classes": list(t.classes)} for j, t in enumerate(tasks)]}


def log_strategy_model(uri: str, run_id: str, label: str, model: nn.Module, tasks: Sequence[Any], step: int) -> str:
    """Log the model on the strategy's run at its final `step` (MLflow links the run's metrics of that step: the
    last validation point and the last accuracy-matrix row); returns the logged model's id. Its description and
    summary metrics come with `describe_model`, once the comparison they belong to is known."""
    # deferred: mlflow.pytorch and mlflow.models are heavy imports that only model logging needs
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    wrapped = AllHeadsModel(model, len(tasks)).eval()
    example = tasks[-1].x_test[:INPUT_EXAMPLE_ROWS].numpy().astype(np.float32)
    with torch.no_grad():
        output = wrapped(torch.from_numpy(example)).numpy()
    mlflow.set_tracking_uri(uri)
    # MLflow 3 files a logged model under the active experiment, not its run's: without this the driver's models
    # land in "Default", away from their runs
    mlflow.set_experiment(experiment_id=tracking.client(uri).get_run(run_id).info.experiment_id)
    common = dict(name=model_name(label), run_id=run_id, step=step, input_example=example,
                  signature=infer_signature(example, output), metadata=heads_metadata(tasks))
    try:
        info = mlflow.pytorch.log_model(wrapped, serialization_format="pt2", tags={LABEL_TAG: label},
                                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"], **common)
    except Exception as e:  # noqa: BLE001 - torch.export cannot trace every backbone (some Hugging Face models)
        say(f"{label}: torch.export could not trace the model ({str(e).splitlines()[0][:160]}); logging it in the "
            f"pickle format instead (load it only from a store you trust)")
        info = mlflow.pytorch.log_model(wrapped, serialization_format="pickle",
                                        pip_requirements=["torch", "forgetless"],
                                        tags={LABEL_TAG: label, "forgetless.serialization": "pickle"}, **common)
    return info.model_id


def describe_model(uri: str, run_id: str, model_id: str, description: str, summary: dict[str, float]) -> None:
    """The logged model's page: its description (MLflow shows this tag there) and the run's step-0 summary metrics."""
    tracking.client(uri).set_logged_model_tags(model_id, {NOTE_TAG: description})
    link_metrics(uri, run_id, model_id, summary)


NOTE_TAG = "mlflow.note.content"


def link_metrics(uri: str, run_id: str, model_id: str, metrics: dict[str, float]) -> None:
    """The step-0 summary metrics on the logged model's page (MLflow links only the metrics of the model's step)."""
    # deferred: mlflow is a 2 s import that only the processes that log need
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, 0, model_id=model_id) for k, v in metrics.items() if not math.isnan(float(v))]
    if items:
        tracking.client(uri).log_batch(run_id, metrics=items)


def find_strategy_run(uri: str, run_id: str, label: str | None):
    """The strategy run to register: `run_id` itself when it is one, else its child run labelled `label`."""
    c = tracking.client(uri)
    run = c.get_run(run_id)
    if LABEL_TAG in run.data.tags or run.data.tags.get("forgetless.mode") == "transfer":
        return run
    children = c.search_runs([run.info.experiment_id], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{run_id}'",
                             max_results=1000)
    labels = {ch.info.run_name: ch for ch in children if ch.data.tags.get("forgetless.mode") == "transfer"}
    if label is None or label not in labels:
        raise ConfigError(f"register: run {run_id} is a parent run; choose its strategy with --strategy, one of "
                          f"{sorted(labels)}")
    return labels[label]


def logged_model_id(run) -> str:
    """The id of the model a strategy run logged last (an MLflow 3 logged model, not a run artifact: load it with
    `models:/<id>`)."""
    outputs = run.outputs.model_outputs if run.outputs else []
    if not outputs:
        raise ConfigError(f"run {run.info.run_id} ({run.info.run_name}) has no logged model; run with "
                          f"tracking.log_model: true")
    return outputs[-1].model_id


def register_strategy_model(uri: str, run_id: str, label: str | None, registered_name: str | None,
                            alias: str) -> tuple[str, str, str]:
    """Put a strategy run's logged model in the registry under `registered_name` (default: the label), point `alias`
    at the new version and tag it with the run's forgetting metrics; returns (name, version, label)."""
    # deferred: mlflow is a 2 s import that only the processes that log need
    import mlflow

    run = find_strategy_run(uri, run_id, label)
    c = tracking.client(uri)
    model_id = logged_model_id(run)
    name = registered_name or model_name(run.info.run_name)
    mlflow.set_tracking_uri(uri)
    version = mlflow.register_model(f"models:/{model_id}", name).version
    c.set_registered_model_alias(name, alias, version)
    metrics = run.data.metrics
    tags = {k: repr(float(metrics[k])) for k in REGISTRY_TAG_METRICS if k in metrics}  # full precision (docs/metrics.md)
    tags.update({"strategy": run.data.tags.get("strategy", ""), "mlflow_run_id": run.info.run_id,
                 MODEL_ID_TAG: model_id})
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, v)
    return name, str(version), run.info.run_name
