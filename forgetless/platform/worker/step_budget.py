"""An equal optimizer-step budget (`train.step_budget`): every strategy trains each task for exactly that many optimizer
steps, summed over its phases, so that a comparison of speed or efficiency is made at equal cost.

How the budget is shared among phases is the strategy's own phase rule: each phase ends by its own rule (its epochs, its
`max_steps`, its stop rule) or when the budget is spent, whichever comes first; the last phase takes what is left and
runs until the budget is spent (its epoch count and stop rule no longer end it). A phase that starts with the budget
spent is skipped. The platform only counts steps; it knows nothing of strategy names.
"""
from __future__ import annotations

import math
from dataclasses import replace

from forgetless.data.sharding import epoch_steps
from forgetless.platform.worker.run_reporting import log
from forgetless.platform.worker.worker_run import WorkerRun
from forgetless.strategies.base import Phase


def steps_left(budget: int | None, stage_step: int) -> int | None:
    """Optimizer steps the current task may still take; None without a budget."""
    return None if budget is None else max(0, budget - stage_step)


def budget_spent(budget: int | None, stage_step: int) -> bool:
    return budget is not None and stage_step >= budget


def updates_per_epoch(shard_size: int, batch_size: int, accumulation: int) -> int:
    """Optimizer updates one epoch of a rank's shard makes (at least 1: a budget run never loops without steps)."""
    micro_batches = math.ceil(shard_size / batch_size)
    return max(1, micro_batches // max(1, accumulation))


def phase_under_budget(phase: Phase, budget: int | None, stage_step: int, is_last: bool, epoch_updates: int,
                       epochs_done: int = 0) -> Phase:
    """The phase as it runs under the budget: unchanged without one or when it is not the task's last phase (the
    budget check in the loop ends it early); the last phase with enough epochs to spend what is left (one more for
    an accumulation boundary that falls across epochs; `epochs_done` of a resumed phase before them) and no stop rule
    or step cap of its own."""
    left = steps_left(budget, stage_step)
    if left is None or not is_last:
        return phase
    return replace(phase, epochs=epochs_done + math.ceil(left / epoch_updates) + 1, max_steps=None, stop_rule=None)


def budgeted_phase(run: WorkerRun, stage: int, phase: Phase, is_last: bool) -> Phase:
    """The phase as it runs under the job's step budget (step_budget.py); unchanged without one."""
    data, job = run.tasks[stage], run.job
    # the same at every worker count: global batches of the config's size (data/sharding.py)
    epoch_updates = max(1, epoch_steps(len(data.x_train), run.batch_plan()))
    return phase_under_budget(phase, job.step_budget, run.state.stage_step, is_last, epoch_updates, run.state.epoch)


def skip_phase(run: WorkerRun, stage: int, phase: Phase) -> None:
    """A phase that starts with the step budget spent: no engine, no step, recorded with 0 steps."""
    state = run.state
    state.phase_log.append({"stage": stage, "phase": phase.name, "epochs": 0, "steps": 0, "stopped_early": True,
                            "end_step": state.global_step, "budget_spent": True})
    state.phase_done = True
    log(run, f"phase {phase.name} skipped: the step budget ({run.job.step_budget}) is spent")
