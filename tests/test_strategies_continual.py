"""Unit tests of the continual strategies (fast, input_space, input_space_ci, l2_sp, ewc, lwf) on plain PyTorch.

A few optimizer steps are run by the platform's own `train_step` (the phase's trainable set and optimizer, its eval-mode
modules, its learning-rate multipliers and step hooks, cross-entropy plus the strategy's extra loss) with a torch
optimizer instead of DeepSpeed, without Ray: what a phase may change must change, everything else must stay
bit-identical.
"""
from __future__ import annotations

import copy

import pytest
import torch

from forgetless.backbones import CNN2d, TransferModel
from forgetless.config import OptimConfig
from forgetless.platform.worker.engine import make_optimizer
from forgetless.strategies import make_strategy
from forgetless.strategies.base import TaskInfo
from forgetless.strategies.fast import UpdateNormCap, plateau_rule, warmup_multipliers
from forgetless.strategies.input_space import AdditivePrompt, InputTransform
from forgetless.strategies.training import TorchEngine, lr_scheduler, set_train_mode, set_trainable, train_step

SHAPE = (1, 8, 8)
TASKS = [TaskInfo(i, f"task{i}", 3 if i == 0 else 2, [], SHAPE) for i in range(4)]


def make_model(strategy) -> TransferModel:
    torch.manual_seed(0)
    model = TransferModel(CNN2d(SHAPE, channels=[4, 8]), [t.num_classes for t in TASKS], seed=0)
    strategy.build(model, TASKS)
    return model


def batches_of(task: TaskInfo, n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed + task.index)
    data = [(torch.rand(8, *SHAPE, generator=g), torch.randint(0, task.num_classes, (8,), generator=g))
            for _ in range(n)]
    return lambda: iter(data)


def identity_mean(t: torch.Tensor) -> torch.Tensor:
    return t  # one "rank"


def prepare(strategy, model, upto: int) -> None:
    """What the platform does before task `upto`: after_source, then after_task of every earlier target."""
    strategy.after_source(model, TASKS[0], batches_of(TASKS[0]), identity_mean)
    for t in TASKS[1:upto]:
        strategy.after_task(model, t, batches_of(t), identity_mean)


def train_phase(strategy, model, task: TaskInfo, phase, steps: int = 3) -> None:
    set_trainable(model, phase)
    opt = make_optimizer(phase, OptimConfig(optimizer="adam", lr=0.05))
    engine = TorchEngine(model, opt, lr_scheduler(opt, phase))
    set_train_mode(model, phase)
    x, y = next(batches_of(task, seed=99)())
    for _ in range(steps):
        train_step(engine, model, strategy, phase, task, x, y, torch.Generator().manual_seed(0))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CASES = {
    # label: (strategy, params, {phase name: prefixes of state-dict keys that must change})
    "fast": ("fast", {"align_max_steps": 50}, {"align": ["heads.t2."], "adapt": ["heads.t2.", "backbone."]}),
    "input_space_conv": ("input_space", {}, {"input_space": ["heads.t2.", "input_transforms.t2."]}),
    "input_space_prompt": ("input_space", {"transform": "prompt"},
                           {"input_space": ["heads.t2.", "input_transforms.t2."]}),
    "input_space_ci": ("input_space_ci", {}, {"input_space_ci": ["heads.t2.", "input_transforms.t"]}),
    "l2_sp": ("l2_sp", {}, {"finetune": ["heads.t2.", "backbone."]}),
    "ewc": ("ewc", {}, {"finetune": ["heads.t2.", "backbone."]}),
    "lwf": ("lwf", {"warmup_epochs": 1}, {"warmup": ["heads.t2."], "lwf": ["heads.t2.", "backbone."]}),
}


@pytest.mark.parametrize("label", list(CASES))
def test_what_may_change_does_and_the_rest_is_bit_identical(label):
    name, params, expected = CASES[label]
    strategy = make_strategy(name, params, epochs=1, lr=0.01)
    model = make_model(strategy)
    task = TASKS[2]
    prepare(strategy, model, upto=2)
    phases = strategy.phases(model, task)
    assert [p.name for p in phases] == list(expected)
    for phase in phases:
        before = snapshot(model)
        train_phase(strategy, model, task, phase)
        after = snapshot(model)
        may_change = expected[phase.name]
        # BatchNorm statistics move only where the backbone is in train mode (not in eval_modules)
        backbone_frozen = any(m is model.backbone for m in phase.eval_modules)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        for k in changed:
            assert any(k.startswith(p) for p in may_change), f"{label}/{phase.name}: {k} changed but must not"
            if backbone_frozen:
                assert not k.startswith("backbone."), f"{label}/{phase.name}: frozen backbone changed ({k})"
        for prefix in may_change:
            assert any(k.startswith(prefix) for k in changed), f"{label}/{phase.name}: nothing under {prefix} changed"
        # the parameter groups hold exactly the trainable parameters, and only they require grad
        trainable = {id(p) for p in phase.trainable()}
        assert trainable == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("transform", [
    InputTransform((1, 8, 8), hidden_channels=4, layers=2, kernel_size=3),
    InputTransform((1, 40), hidden_channels=4, layers=3, kernel_size=5),
    AdditivePrompt((1, 8, 8)),
], ids=["conv2d", "conv1d", "prompt"])
def test_input_transform_is_the_identity_at_init(transform):
    shape = (5, 1, 40) if isinstance(transform, InputTransform) and isinstance(transform.delta[0], torch.nn.Conv1d) \
        else (5, 1, 8, 8)
    x = torch.randn(shape)
    transform.train()
    assert torch.equal(transform(x), x)
    assert float(transform.last_sq_dist.detach()) == 0.0
    # ... and the conv variant really uses 2-D convolutions for images and 1-D for sequences
    if isinstance(transform, InputTransform):
        conv = torch.nn.Conv2d if len(shape) == 4 else torch.nn.Conv1d
        assert all(isinstance(m, conv) for m in transform.delta if not isinstance(m, torch.nn.ReLU))


def test_input_space_transforms_are_per_task_and_applied_by_the_model():
    s = make_strategy("input_space", {}, epochs=1, lr=0.01)
    model = make_model(s)
    assert set(model.input_transforms) == {"t1", "t2", "t3"}  # targets only: the source sees its raw input
    assert len({id(m) for m in model.input_transforms.values()}) == 3
    x = torch.rand(4, *SHAPE)
    with torch.no_grad():
        model.input_transforms["t1"].delta[-1].bias.fill_(0.5)
    model.eval()
    assert torch.allclose(model(x, 1), model.heads["t1"](model.backbone(x + 0.5)))
    assert torch.equal(model(x, 2), model.heads["t2"](model.backbone(x)))


def test_input_space_ci_shares_one_transform_and_trains_a_growing_head():
    s = make_strategy("input_space_ci", {}, epochs=1, lr=0.01)
    model = make_model(s)
    assert len({id(m) for m in model.input_transforms.values()}) == 1
    prepare(s, model, upto=3)
    store = model.extras["input_space_ci"]
    assert float(store.filled) == 1.0 and sum(float(store.get("fisher", n).sum()) for n in store.names) > 0
    x, y = next(batches_of(TASKS[3])())
    model.train()
    logits = model(x, 3)
    # the growing-head term is a cross-entropy over all seen classes (3 + 2 + 2 + 2), so it is positive
    assert float(s.extra_loss(model, x, y, TASKS[3], logits)) > 0


@pytest.mark.parametrize("name,params", [("l2_sp", {"alpha": 1.0, "beta": 0.0}), ("ewc", {"ewc_lambda": 10.0})])
def test_penalties_are_zero_at_the_anchor_and_positive_away(name, params):
    s = make_strategy(name, params, epochs=1, lr=0.01)
    model = make_model(s)
    x, y = next(batches_of(TASKS[1])())
    logits = model(x, 1)
    # before the anchor is taken there is no backbone penalty at all
    before = s.extra_loss(model, x, y, TASKS[1], logits)
    assert before is None or float(before) == 0.0
    prepare(s, model, upto=1)
    assert float(s.extra_loss(model, x, y, TASKS[1], logits)) == 0.0
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.1)
    away = s.extra_loss(model, x, y, TASKS[1], logits)
    assert float(away) > 0
    away.backward()  # the penalty pulls the backbone back: a gradient reaches it
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_ewc_fisher_accumulates_over_tasks():
    s = make_strategy("ewc", {}, epochs=1, lr=0.01)
    model = make_model(s)
    store = model.extras["ewc"]
    s.after_source(model, TASKS[0], batches_of(TASKS[0]), identity_mean)
    f0 = {n: store.get("fisher", n).clone() for n in store.names}
    assert all(torch.all(v >= 0) for v in f0.values()) and sum(float(v.sum()) for v in f0.values()) > 0
    s.after_task(model, TASKS[1], batches_of(TASKS[1]), identity_mean)
    grew = [bool(torch.all(store.get("fisher", n) >= f0[n]) and torch.any(store.get("fisher", n) > f0[n]))
            for n in store.names]
    assert all(torch.all(store.get("fisher", n) >= f0[n]) for n in store.names) and any(grew)


def test_ewc_state_is_in_the_state_dict_so_checkpoints_keep_it():
    s = make_strategy("ewc", {}, epochs=1, lr=0.01)
    model = make_model(s)
    prepare(s, model, upto=1)
    rebuilt = make_model(s)  # what the platform does on resume / after each phase
    rebuilt.load_state_dict(model.state_dict())
    for n in model.extras["ewc"].names:
        assert torch.equal(rebuilt.extras["ewc"].get("fisher", n), model.extras["ewc"].get("fisher", n))


def test_lwf_targets_come_from_the_frozen_old_model():
    s = make_strategy("lwf", {}, epochs=1, lr=0.01)
    model = make_model(s)
    prepare(s, model, upto=2)
    reference = copy.deepcopy(model).eval()  # the model as it was when task 1 ended
    with torch.no_grad():  # the live model drifts (as training task 2 would make it)
        for p in model.backbone.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.eval()
    x, y = next(batches_of(TASKS[2])())
    targets = s.old_targets(model, x, [0, 1])
    for j, t in enumerate(targets):
        assert torch.allclose(t, reference(x, j), atol=1e-6)
        assert not torch.allclose(t, model(x, j), atol=1e-3)
    assert not any(t.requires_grad for t in targets)
    # the distillation term is positive and its gradient reaches the live backbone, not the frozen copy
    model.train()
    loss = s.extra_loss(model, x, y, TASKS[2], model(x, 2))
    loss.backward()
    assert any(p.grad is not None for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.extras["lwf_old"].parameters())


def test_fast_plateau_rule_and_phase_switch():
    rule = plateau_rule(window=2, tolerance=0.05)
    losses = [2.0, 1.0, 0.6, 0.4, 0.39, 0.385, 0.38]
    stops = [rule(losses[: i + 1]) for i in range(len(losses))]
    # improving fast: keep aligning; the first check where the last 2 evaluations gained < 5% switches
    assert stops == [False, False, False, False, False, True, True]
    s = make_strategy("fast", {"plateau_window": 2, "plateau_tolerance": 0.05, "align_max_steps": 37,
                               "align_eval_every_steps": 4}, epochs=3, lr=0.01)
    model = make_model(s)
    align, adapt = s.phases(model, TASKS[1])
    assert align.eval_every_steps == 4 and align.max_steps == 37 and align.eval_modules == [model.backbone]
    assert [align.stop_rule(losses[: i + 1]) for i in range(len(losses))] == stops
    # adapt: backbone lr = rho x head lr, warmed up linearly
    lrs = {g.name: g.lr for g in adapt.param_groups}
    assert lrs["backbone"] == pytest.approx(0.1 * lrs["head"])
    assert warmup_multipliers(4)(0) == [0.25, 1.0] and warmup_multipliers(4)(10) == [1.0, 1.0]


def test_fast_update_cap_bounds_each_backbone_step():
    s = make_strategy("fast", {"backbone_update_cap": 1e-3, "warmup_steps": 0}, epochs=1, lr=0.01)
    model = make_model(s)
    _, adapt = s.phases(model, TASKS[1])
    before = [p.detach().clone() for p in model.backbone.parameters()]
    train_phase(s, model, TASKS[1], adapt, steps=1)
    step = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.backbone.parameters(), before)))
    assert 0 < float(step) <= 1e-3 * (1 + 1e-4)  # float32 rounding of the rescaled step
    assert isinstance(adapt.after_step.__self__, UpdateNormCap) and adapt.after_step.__self__.clipped_steps == 1


def test_strategies_are_tagged_with_source_and_fidelity():
    tags = {n: make_strategy(n, {}, 1, 0.01).tags() for n in ("fast", "input_space", "input_space_ci", "l2_sp",
                                                               "ewc", "lwf")}
    assert tags["fast"]["fidelity"] == "interpretation" and "2007.01388" in tags["fast"]["strategy_source"]
    assert tags["input_space"]["fidelity"] == "interpretation"
    assert "2306.02947" in tags["input_space"]["strategy_source"]
    assert all(tags[n]["fidelity"] == "confirmed" for n in ("l2_sp", "ewc", "lwf"))
