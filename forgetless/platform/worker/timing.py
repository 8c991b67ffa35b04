"""Where a strategy run's wall time goes: named parts, in seconds, summed over every invocation of the run.

The worker (world rank 0) adds its parts to the run state as it goes; the driver adds the parts it sees (Ray Train
starting the controller and workers, the run ending, reading the result back, MLflow artifacts, the model). The sum
of the parts other than `training` is the run's fixed cost, what `benchmarks/fixed_cost.py` reports.
Wall-clock stamps taken on the driver and on a worker are compared only for `start_workers` and `finish`; on a
multi-node cluster those two carry the nodes' clock offset.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

# In the order a run goes through them, with what each covers.
PARTS: dict[str, str] = {
    "start_workers": "driver submits the Ray Train run -> worker function entered (controller and worker processes "
                     "started, the worker's imports)",
    "distributed_init": "DeepSpeed imported, torch.distributed (gloo/nccl) set up",
    "model_build": "tasks built, strategy and model built, checkpoint restored or pre-trained weights loaded",
    "tracking": "MLflow in the worker: child run, params, datasets, system metrics monitor, metric points",
    "engine_init": "DeepSpeed engine per phase (and the consolidated model after a phase)",
    "training": "the training loop: forward, backward, optimizer step of every micro-batch",
    "evaluation": "validation curves and the test rows of the accuracy matrix, sharded and all-reduced",
    "checkpoint_save": "every rank's DeepSpeed shard, the consolidated model and the state written and reported",
    "checkpoint_commit": "waiting for Ray Train's controller to commit each checkpoint (the resume point)",
    "finish": "the final checkpoint written and committed, workers and controller stopped, fit() returned",
    "read_back": "the final state read back and verified on the driver",
    "mlflow_artifacts": "driver: summary metrics, accuracy matrix, curves, description",
    "model_logging": "driver: the trained model exported and logged to MLflow",
}


@contextmanager
def timed(seconds: dict[str, float], part: str) -> Iterator[None]:
    """Add the wall time of the block to `seconds[part]`."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        add(seconds, part, time.perf_counter() - t0)


def add(seconds: dict[str, float], part: str, value: float) -> None:
    seconds[part] = seconds.get(part, 0.0) + max(0.0, value)


def fixed_cost(seconds: dict[str, float]) -> float:
    """Everything but the training loop itself."""
    return sum(v for k, v in seconds.items() if k != "training")
