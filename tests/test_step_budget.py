"""train.step_budget: every strategy trains each task for exactly that many optimizer steps over its phases. The counting
(pure functions of step_budget.py) and, on a real embedded Ray cluster, a tiny compare where every strategy's
global_step equals the budget."""
import re

import pytest

from forgetless.config import load_config
from forgetless.platform.worker.job import RunState
from forgetless.platform.worker.step_budget import (budget_spent, phase_under_budget, steps_left,
                                                    updates_per_epoch)
from forgetless.strategies.base import Phase


def _phase(epochs=3, max_steps=None, stop_rule=None) -> Phase:
    return Phase(name="p", epochs=epochs, param_groups=[], max_steps=max_steps, stop_rule=stop_rule)


def test_steps_left_and_spent():
    assert steps_left(None, 7) is None and not budget_spent(None, 10**9)
    assert steps_left(20, 7) == 13 and not budget_spent(20, 19)
    assert steps_left(20, 20) == 0 and budget_spent(20, 20)
    assert steps_left(20, 25) == 0 and budget_spent(20, 25)


def test_updates_per_epoch_counts_micro_batches_and_accumulation():
    assert updates_per_epoch(540, 64, 1) == 9  # 8 full batches and a partial one
    assert updates_per_epoch(512, 64, 1) == 8
    assert updates_per_epoch(540, 64, 2) == 4  # 9 micro-batches, an update every second one
    assert updates_per_epoch(10, 64, 4) == 1  # never 0: a budget run always makes progress


def test_phases_before_the_last_keep_their_own_rule():
    rule = lambda losses: False  # noqa: E731
    p = _phase(epochs=2, max_steps=5, stop_rule=rule)
    assert phase_under_budget(p, 20, 0, False, 9) is p
    assert phase_under_budget(p, None, 0, True, 9) is p  # no budget: nothing changes


def test_last_phase_runs_until_the_budget_is_spent():
    p = _phase(epochs=1, max_steps=3, stop_rule=lambda losses: True)
    # 6 steps spent by an earlier phase, 14 left at 4 updates an epoch: 4 epochs hold them, plus one for a boundary
    out = phase_under_budget(p, 20, 6, True, 4)
    assert out.epochs == 5 and out.max_steps is None and out.stop_rule is None
    assert out.name == p.name and out.param_groups is p.param_groups
    # a resumed phase that has 2 epochs behind it and 8 steps left
    assert phase_under_budget(p, 20, 12, True, 4, epochs_done=2).epochs == 2 + 2 + 1


def test_run_state_counts_stage_steps_and_resets_them_per_stage():
    s = RunState(task_names=["a", "b", "c"], stage=1)
    s.stage_step, s.global_step = 7, 7
    restored = RunState.from_json(s.to_json())
    assert restored.stage_step == 7
    restored.enter_stage(2)
    assert restored.stage_step == 0 and restored.global_step == 7
    assert RunState.from_json('{"task_names": ["a"]}').stage_step == 0  # a checkpoint from before the field


def test_step_budget_config_field(tiny_config):
    assert load_config(tiny_config()).train.step_budget is None
    cfg = load_config(tiny_config(train={"epochs": 1, "step_budget": 20}))
    assert cfg.train.step_budget == 20
    # the budget shapes the run: its identity (and so its Ray Train run name) changes with it
    plain = load_config(tiny_config(train={"epochs": 1}))
    assert cfg.transfer_key(cfg.strategies[0]) != plain.transfer_key(plain.strategies[0])
    with pytest.raises(Exception, match="step_budget"):
        load_config(tiny_config(train={"step_budget": 0}))


BUDGET = 20


# slow tier (make test-all): CI's 15-minute budget (docs/performance.md); run and reported in the stop's closing note
@pytest.mark.slow
@pytest.mark.e2e
def test_compare_with_a_step_budget_gives_every_strategy_the_same_steps(ray_session, workdir, tiny_config):
    """finetune (one phase, 1 epoch = 9 steps: extended), lp_ft (probe 1 epoch, then fine-tuning for the rest), fast
    (align ends by its step cap, adapt the rest), and an lp_ft whose probe alone outlasts the budget (fine-tuning
    skipped): each ends at exactly BUDGET optimizer steps, with an evaluation at the stop."""
    import forgetless

    cfg = tiny_config(scaling={"num_workers": 1}, train={"epochs": 1, "lr": 0.01, "batch_size": 64,
                                                         "step_budget": BUDGET},
                      pretrain={"epochs": 1, "checkpoint_every": 1, "lr": 0.01, "batch_size": 64},
                      strategies=["finetune", {"name": "lp_ft", "params": {"probe_epochs": 1}},
                                  {"name": "fast", "params": {"align_max_steps": 6, "align_eval_every_steps": 3}},
                                  {"name": "lp_ft", "label": "long_probe", "params": {"probe_epochs": 4}}])
    out = forgetless.compare(cfg)

    for r in out.results:
        assert r.global_step == BUDGET, r.label
        assert sum(p["steps"] for p in r.phase_log) == BUDGET, (r.label, r.phase_log)
        assert r.history[-1]["step"] == BUDGET  # evaluated at the stop
        assert r.metrics["optimizer_steps"] == BUDGET
    phases = {r.label: [(p["phase"], p["steps"]) for p in r.phase_log] for r in out.results}
    assert phases["finetune"] == [("finetune", BUDGET)]
    probe, finetune = phases["lp_ft"]
    assert probe[1] == 9 and finetune[1] == BUDGET - 9
    assert phases["fast"] == [("align", 6), ("adapt", BUDGET - 6)]
    assert [s for _, s in phases["long_probe"]] == [BUDGET, 0]
    lines = out.table().splitlines()[:2 + len(out.results)]  # header, rule, one row per strategy; then the caption
    header, _, *rows = [re.split(r"\s{2,}", line.strip()) for line in lines]
    col = header.index("steps")
    assert [row[col] for row in rows] == [str(BUDGET)] * len(out.results), out.table()
