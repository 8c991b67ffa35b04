"""Backbones, the TransferModel, and the baseline strategies' freezing (plain torch, no Ray)."""
import pytest
import torch

from forgetless.backbones import TransferModel, build_backbone
from forgetless.strategies import make_strategy
from forgetless.strategies.base import TaskInfo
from forgetless.strategies.training import TorchEngine, set_train_mode, set_trainable, train_step


@pytest.mark.parametrize("name, shape", [("mlp", (1, 8, 8)), ("cnn2d", (1, 8, 8)), ("cnn1d", (1, 40))])
def test_backbones_produce_features(name, shape):
    b = build_backbone(name, shape)
    out = b(torch.randn(4, *shape))
    assert out.shape == (4, b.feature_dim)


def test_backbone_shape_errors():
    with pytest.raises(ValueError, match="cnn2d needs image"):
        build_backbone("cnn2d", (1, 40))
    with pytest.raises(ValueError, match="bad params"):
        build_backbone("mlp", (1, 8, 8), {"nope": 1})


def test_heads_are_seeded_identically():
    a = TransferModel(build_backbone("mlp", (1, 8, 8)), [5, 5], seed=3)
    b = TransferModel(build_backbone("mlp", (1, 8, 8)), [5, 5], seed=3)
    assert torch.equal(a.heads["t1"].weight, b.heads["t1"].weight)
    logits = a(torch.randn(2, 1, 8, 8), [0, 1])
    assert logits.shape == (2, 10)


def _train_phase(strategy, model, phase, task, steps=5):
    """A few steps of the platform's train_step, with plain SGD instead of DeepSpeed."""
    set_trainable(model, phase)
    set_train_mode(model, phase)
    engine = TorchEngine(model, torch.optim.SGD([{"params": g.params, "lr": g.lr} for g in phase.param_groups], lr=0.1))
    for _ in range(steps):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 5, (16,))
        train_step(engine, model, strategy, phase, task, x, y, torch.Generator().manual_seed(0))


def _model():
    torch.manual_seed(0)
    return TransferModel(build_backbone("cnn2d", (1, 8, 8), {"channels": [4, 8]}), [5, 5])


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_linear_probe_leaves_backbone_bit_identical_including_bn_stats():
    model = _model()
    s = make_strategy("linear_probe", {}, epochs=1, lr=0.1)
    task = TaskInfo(1, "t", 5, [5, 6, 7, 8, 9])
    before_bb, before_src = _snapshot(model.backbone), _snapshot(model.heads["t0"])
    head_before = model.heads["t1"].weight.detach().clone()
    (phase,) = s.phases(model, task)
    _train_phase(s, model, phase, task)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before_bb[k]), k  # weights and BatchNorm running statistics
    for k, v in model.heads["t0"].state_dict().items():
        assert torch.equal(v, before_src[k])
    assert not torch.equal(model.heads["t1"].weight, head_before)


def test_finetune_changes_backbone_but_keeps_source_head():
    model = _model()
    s = make_strategy("finetune", {"backbone_lr_scale": 0.5}, epochs=1, lr=0.1)
    task = TaskInfo(1, "t", 5, [5, 6, 7, 8, 9])
    (phase,) = s.phases(model, task)
    assert [g.lr for g in phase.param_groups] == [0.05, 0.1]
    before_bb, before_src = _snapshot(model.backbone), _snapshot(model.heads["t0"])
    _train_phase(s, model, phase, task)
    assert any(not torch.equal(v, before_bb[k]) for k, v in model.backbone.state_dict().items())
    assert all(torch.equal(v, before_src[k]) for k, v in model.heads["t0"].state_dict().items())


def test_finetune_keeps_named_backbone_parameters_frozen():
    model = _model()
    frozen_name = next(n for n, _ in model.backbone.named_parameters())
    s = make_strategy("finetune", {"frozen": [frozen_name]}, epochs=1, lr=0.1)
    task = TaskInfo(1, "t", 5, [5, 6, 7, 8, 9])
    (phase,) = s.phases(model, task)
    before = _snapshot(model.backbone)
    _train_phase(s, model, phase, task)
    after = dict(model.backbone.named_parameters())
    assert torch.equal(after[frozen_name], before[frozen_name])
    assert any(not torch.equal(p, before[n]) for n, p in after.items() if n != frozen_name)
    with pytest.raises(ValueError, match="no backbone parameter matches"):
        make_strategy("finetune", {"frozen": ["*nothing*"]}, epochs=1, lr=0.1).phases(_model(), task)


def test_lp_ft_probes_then_finetunes():
    model = _model()
    s = make_strategy("lp_ft", {"probe_epochs": 2}, epochs=3, lr=0.01)
    probe, ft = s.phases(model, TaskInfo(1, "t", 5, []))
    assert probe.epochs == 2 and ft.epochs == 3
    assert {id(p) for p in probe.trainable()} == {id(p) for p in model.heads["t1"].parameters()}
    assert model.backbone in probe.eval_modules
    assert {id(p) for p in model.backbone.parameters()} <= {id(p) for p in ft.trainable()}
    assert probe.param_groups[0].lr == pytest.approx(0.1)
