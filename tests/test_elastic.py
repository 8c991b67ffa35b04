"""Elastic runs (issue 32): `scaling.num_workers: [MIN, MAX]`, the batch rule that keeps the global batch, the
learning-rate schedule and the data order of the config at any worker count, and what a resize leaves in the run's
state and MLflow tags. Fast: no Ray here (the node-loss test on real processes is tests/faults/test_node_loss.py)."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY
from forgetless.config import ConfigError, load_config
from forgetless.data.sharding import BatchSplitError, accumulation_at, batch_plan, epoch_steps, shard_batches


def _cfg(**scaling):
    c = copy.deepcopy(TINY)
    c["scaling"] = scaling
    return load_config(c)


# ---------------------------------------------------------------------------------------------------------------------
# the config


@pytest.mark.parametrize("given", [[1, 2], {"min": 1, "max": 2}, (1, 2)])
def test_a_range_of_workers_is_an_elastic_run(given):
    sc = _cfg(num_workers=given).scaling
    assert (sc.num_workers, sc.min_workers, sc.elastic) == (2, 1, True)
    assert sc.ray_num_workers() == (1, 2) and list(sc.worker_counts()) == [1, 2]
    assert sc.describe_workers() == "1-2 workers (elastic)"
    fixed = _cfg(num_workers=2).scaling
    assert (fixed.min_workers, fixed.elastic, fixed.ray_num_workers(), list(fixed.worker_counts())) == \
        (None, False, 2, [2])
    same = _cfg(num_workers=[2, 2]).scaling  # a range of one count is a fixed run
    assert not same.elastic and same.ray_num_workers() == 2


@pytest.mark.parametrize("given, says", [
    ([2, 1], "num_workers: the range's min (2) is above its max (1)"),
    ([0, 2], "num_workers: the range [0, 2] starts below 1"),
    ({"min": 1}, "neither a count nor a range"),
    ([1, 2, 3], "neither a count nor a range"),
    ([1.5, 2], "must hold two whole numbers"),
])
def test_a_bad_range_is_one_line_naming_the_field(given, says):
    with pytest.raises(ConfigError, match="scaling") as e:
        _cfg(num_workers=given)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_range_whose_counts_cannot_split_the_global_batch_is_refused():
    c = copy.deepcopy(TINY)
    c["scaling"], c["train"]["batch_size"] = {"num_workers": [2, 4]}, 5  # global batch 20: 3 workers cannot split it
    with pytest.raises(ConfigError) as e:
        load_config(c)
    msg = str(e.value)
    assert "scaling.num_workers: with 3 workers the global batch of 20 samples does not split evenly" in msg
    assert "train.batch_size 5 x 4 workers x 1 accumulation" in msg and "\n" not in msg
    c["train"]["batch_size"] = 6  # 24 = 2 x 12 = 3 x 8 = 4 x 6; the pre-training's 64 x 4 = 256 is checked too
    with pytest.raises(ConfigError, match="with 3 workers the global batch of 256 .*pretrain.batch_size 64"):
        load_config(c)
    c["pretrain"]["batch_size"] = 6
    assert load_config(c).scaling.elastic


def test_the_identity_does_not_depend_on_the_worker_count():
    fixed, elastic, wider = _cfg(num_workers=2), _cfg(num_workers=[1, 2]), _cfg(num_workers=[4, 4])
    s = fixed.strategies[0]
    # the fewest workers are not part of it: the global batch is the max's (and a fixed run keeps its old hash)
    assert fixed.transfer_key(s) == elastic.transfer_key(s) and fixed.pretrain_key() == elastic.pretrain_key()
    assert wider.transfer_key(s) != fixed.transfer_key(s)  # another max is another global batch: another experiment


# ---------------------------------------------------------------------------------------------------------------------
# the batch rule and the data order


def test_accumulation_grows_as_workers_go_and_micro_batches_never_exceed_the_config():
    assert accumulation_at(64, 32) == 2 and accumulation_at(32, 32) == 1 and accumulation_at(48, 32) == 2
    assert accumulation_at(40, 32) == 2 and accumulation_at(30, 8) == 5  # 6 x 5 (4 micro-batches of 7.5 would not)
    counts = range(1, 5)
    for world, accumulation, micro in [(4, 1, 6), (3, 2, 4), (2, 2, 6), (1, 4, 6)]:
        plan = batch_plan(6, 1, 4, world, counts)  # global batch 24
        assert (plan.global_batch, plan.accumulation, plan.micro_batch) == (24, accumulation, micro)
        assert plan.micro_batch <= 6 and plan.micro_batch * plan.accumulation * world == 24
    # at its most workers a plan is the config's: its micro-batch and its accumulation
    assert batch_plan(32, 3, 2, 2).accumulation == 3 and batch_plan(32, 3, 2, 2).micro_batch == 32
    with pytest.raises(BatchSplitError, match="with 3 workers"):
        batch_plan(5, 1, 4, 4, counts)


def _steps(n: int, world: int, seed: int = 7, counts=range(1, 5)):
    """Per optimizer step: the samples all ranks took (sorted), and each rank's micro-batch sizes."""
    plan = batch_plan(6, 1, 4, world, counts)
    per_rank = [list(shard_batches(torch.arange(n), torch.arange(n), plan, r, seed)) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1  # every rank the same number of micro-batches
    steps = []
    for i in range(0, len(per_rank[0]), plan.accumulation):
        taken = torch.cat([xb for p in per_rank for xb, _ in p[i:i + plan.accumulation]])
        sizes = {len(xb) for p in per_rank for xb, _ in p[i:i + plan.accumulation]}
        assert len(sizes) == 1  # equal micro-batches within a step: the mean of means is the global mean
        steps.append(sorted(taken.tolist()))
    assert len(steps) == epoch_steps(n, plan)
    return steps


def test_the_data_order_is_the_same_at_every_worker_count():
    n = 100  # 4 global batches of 24 and a tail of 4, kept whole (12 = lcm of W x accumulation over 1..4 is > 4)
    one = _steps(n, 1)
    for world in (2, 3, 4):
        assert _steps(n, world) == one
    assert [len(s) for s in one] == [24, 24, 24, 24]
    tail = _steps(110, 2)  # a tail of 14 keeps 12: a multiple every count splits into equal micro-batches
    assert [len(s) for s in tail] == [24] * 4 + [12] and tail == _steps(110, 3) == _steps(110, 1)
    assert _steps(n, 2, seed=8) != one  # the epoch's seed orders it


def test_the_averaged_gradient_is_the_same_at_every_worker_count():
    """What DeepSpeed computes per step: each rank sums its micro-batch mean losses / accumulation, the ranks'
    gradients are averaged. With the plan's equal micro-batches that is the global batch's mean gradient at any W
    (fp32, summed in another order: equal to float tolerance, not bit for bit)."""
    torch.manual_seed(0)
    x, y = torch.randn(96, 5), torch.randn(96)
    w0 = torch.randn(5)

    def step_gradients(world: int) -> list[torch.Tensor]:
        plan = batch_plan(6, 1, 4, world, range(1, 5))
        per_rank = [list(shard_batches(x, y, plan, r, 3)) for r in range(world)]
        grads = []
        for i in range(0, len(per_rank[0]), plan.accumulation):
            total = torch.zeros(5)
            for p in per_rank:
                w = w0.clone().requires_grad_(True)
                loss = sum(((xb @ w - yb) ** 2).mean() for xb, yb in p[i:i + plan.accumulation]) / plan.accumulation
                loss.backward()
                total += w.grad
            grads.append(total / world)
        return grads

    reference = step_gradients(4)
    for world in (1, 2, 3):
        for a, b in zip(step_gradients(world), reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# what a resize leaves behind


def _run(world: int, state):
    from types import SimpleNamespace

    from forgetless.platform.worker.worker_run import WorkerRun

    job = SimpleNamespace(display_name="finetune", config=load_config(copy.deepcopy(TINY)))
    return WorkerRun(job, 0, world, torch.device("cpu"), [], [], None, None, state)


def test_a_resize_is_a_line_a_record_and_tags(capsys):
    from forgetless.platform.worker.job import RunState
    from forgetless.platform.worker.run_reporting import note_worker_count, worker_tags

    state = RunState(task_names=["a", "b"])
    assert note_worker_count(_run(2, state)) is None  # the first group: recorded, nothing to say
    state.global_step = 40
    assert note_worker_count(_run(2, state)) is None  # a restart on as many workers: no resize
    line = note_worker_count(_run(1, state))
    assert line.startswith("resized: 2 -> 1 workers at step 40: a worker or its node was lost")
    state.global_step = 55
    assert "resized: 1 -> 2 workers at step 55: room returned" in note_worker_count(_run(2, state))
    assert [(r["step"], r["workers"]) for r in state.workers] == [(0, 2), (40, 1), (55, 2)]
    err = capsys.readouterr().err
    assert "[forgetless finetune] resized: 2 -> 1 workers at step 40" in err and err.count("resized:") == 2
    tags = worker_tags(_run(2, state))
    assert tags["forgetless.workers"] == "2" and tags["forgetless.resizes"] == "2"
    assert tags["forgetless.resize.1"].startswith("2 -> 1 workers at step 40, ") and \
        tags["forgetless.resize.1"].endswith("(node lost)")
    assert tags["forgetless.resize.2"].endswith("(room returned)")


def test_jobs_status_lists_the_resizes_of_a_jobs_log():
    from forgetless.platform.driver.jobs import resizes_of

    log = ("[forgetless] strategy lost: Ray Train run tiny-lost-0a033f05 (1-2 workers (elastic), DeepSpeed ZeRO-0)\n"
           "\x1b[36m(RayTrainWorker pid=1)\x1b[0m [forgetless lost] resized: 2 -> 1 workers at step 30: a worker or its "
           "node was lost (or the cluster has no room for more); the global batch, learning-rate schedule and data "
           "order are unchanged\n"
           "(RayTrainWorker pid=2) [forgetless lost] resized: 1 -> 2 workers at step 95: room returned in the "
           "cluster; the global batch, learning-rate schedule and data order are unchanged\n")
    assert resizes_of(log) == [
        "lost: 2 -> 1 workers at step 30: a worker or its node was lost (or the cluster has no room for more)",
        "lost: 1 -> 2 workers at step 95: room returned in the cluster"]
    assert resizes_of("[forgetless] nothing resized here\n") == []
