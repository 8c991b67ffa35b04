"""One worker's view of a run (WorkerRun): who it is, what it trains, how far it got.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from forgetless.backbones import TransferModel
from forgetless.data import TaskData
from forgetless.data.sharding import BatchPlan, batch_plan
from forgetless.platform.worker.job import RunState, WorkerJob
from forgetless.strategies.base import Strategy, TaskInfo


@dataclass
class WorkerRun:
    """One worker's view of the run: who it is, what it trains, and how far it got."""

    job: WorkerJob
    rank: int
    world: int
    device: torch.device
    tasks: list[TaskData]
    infos: list[TaskInfo]
    strategy: Strategy
    model: TransferModel
    state: RunState
    engine: Any = None  # the DeepSpeed engine of the running phase
    resume_dir: str | None = None  # a local copy of the restored checkpoint, until the phase's optimizer is loaded
    commit_wait_seconds: float = 0.0  # rank 0: time spent waiting for Ray Train to commit checkpoints
    commits: int = 0  # rank 0: checkpoints written by this worker group
    phases_in_stage: int = 1  # of the stage in training (the progress record's ETA)
    skipped_checkpoints: tuple[str, ...] = ()  # damaged checkpoints restore passed over (their folders stay)
    eval_suites: list | None = None  # the config's eval_tasks, built on first use (worker/eval_tasks.py)

    @property
    def zero_stage(self) -> int:
        return self.job.config.deepspeed.zero_stage

    def batch_plan(self) -> BatchPlan:
        """How each optimizer step's global batch (train.batch_size x the most workers x accumulation, the config's
        at any worker count) is split at this run's worker count (data/sharding.py)."""
        cfg = self.job.config
        return batch_plan(self.job.optim.batch_size, cfg.deepspeed.gradient_accumulation_steps,
                          cfg.scaling.num_workers, self.world, cfg.scaling.worker_counts())

    @property
    def partitioned(self) -> bool:
        """ZeRO-3 with a strategy that leaves weights to the engine: the model stays partitioned from construction to
        the export, checkpoints hold each rank's partition, no rank ever holds the whole model (but rank 0 at an
        export)."""
        return keeps_partitions(self.job, self.strategy)


def keeps_partitions(job: WorkerJob, strategy: Strategy) -> bool:
    return job.config.deepspeed.zero_stage == 3 and strategy.works_on_partitions
