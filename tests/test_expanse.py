"""EXPANSE: widened networks keep the source exact, only new units learn, widths follow the ratio, bad input fails
early."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import forgetless
from forgetless.backbones import TransferModel, build_backbone
from forgetless.config import ConfigError, load_config
from forgetless.platform.worker.model_io import load_pretrained, load_torch_file
from forgetless.platform.driver.preflight import preflight
from forgetless.strategies import make_strategy
from forgetless.strategies.base import TaskInfo
from forgetless.strategies.expanse import ExpandedBackbone, GrowLayer


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


ARCHS = [
    ("mlp", (1, 8, 8), {"hidden": [32, 16]}),
    ("mlp", (1, 8, 8), {"hidden": [32, 16], "batchnorm": True, "dropout": 0.2}),
    ("cnn2d", (1, 8, 8), {"channels": [8, 12]}),
    ("cnn1d", (1, 40), {"channels": [6, 10]}),
]
IDS = ["mlp", "mlp_bn_dropout", "cnn2d", "cnn1d"]


def _pretrained(name, shape, params, steps=5):
    """A model with non-trivial weights and BatchNorm statistics (a few real SGD steps on random data)."""
    torch.manual_seed(0)
    model = TransferModel(build_backbone(name, shape, params), [5, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        x, y = torch.randn(32, *shape), torch.randint(0, 5, (32,))
        opt.zero_grad()
        F.cross_entropy(model(x, 0), y).backward()
        opt.step()
    return model.eval()


def _expanded(name, shape, params, pretrained, ratio=0.25):
    """What the platform does: build (surgery on the freshly built model), then load the pretrained weights."""
    torch.manual_seed(123)  # a different fresh init than the pretrained one: loading must overwrite every old weight
    model = TransferModel(build_backbone(name, shape, params), [5, 3])
    strategy = make_strategy("expanse", {"ratio": ratio}, epochs=4, lr=0.05)
    strategy.build(model, [TaskInfo(0, "s", 5, list(range(5))), TaskInfo(1, "t", 3, [0, 1, 2])])
    load_pretrained(model, pretrained.state_dict())
    return model.eval(), strategy


@pytest.mark.parametrize("arch", ARCHS, ids=IDS)
def test_source_logits_are_bit_identical(arch):
    pretrained = _pretrained(*arch)
    model, _ = _expanded(*arch, pretrained)
    x = torch.randn(64, *arch[1])
    with torch.no_grad():
        assert torch.equal(model(x, 0), pretrained(x, 0))
        # the target head reads old and new features
        assert model.heads["t1"].in_features == model.backbone.old_dim + model.backbone.new_dim
        assert model(x, 1).shape == (64, 3)


@pytest.mark.parametrize("arch", ARCHS, ids=IDS)
def test_only_new_units_learn_and_old_stay_bit_identical(arch):
    pretrained = _pretrained(*arch)
    model, strategy = _expanded(*arch, pretrained)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    phases = strategy.phases(model, TaskInfo(1, "t", 3, [0, 1, 2]))
    assert [p.name for p in phases] == ["step1_clean", "step2_augmented"]
    for phase in phases:
        trainable = {id(p) for p in phase.trainable()}
        for p in model.parameters():  # what the platform's engine does for a phase
            p.requires_grad_(id(p) in trainable)
        opt = torch.optim.SGD(phase.trainable(), lr=0.05)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            model.train()
            for m in phase.eval_modules:
                m.eval()
            x, y = torch.randn(16, *arch[1]), torch.randint(0, 3, (16,))
            if phase.augment is not None:
                x = phase.augment(x, gen)
            opt.zero_grad()
            F.cross_entropy(model(x, 1), y).backward()
            for k, p in model.backbone.named_parameters():
                if k.startswith("grow."):
                    assert p.grad is not None and p.grad.abs().sum() > 0, f"new unit {k} got no gradient"
                else:
                    assert p.grad is None, f"old unit {k} got a gradient"
            opt.step()
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("backbone.body.") or k.startswith("heads.t0."):
            assert torch.equal(after[k], v), f"{k} changed"  # weights and BatchNorm statistics
    changed = [k for k in before if k.startswith("backbone.grow.") and k.endswith("weight")
               and not torch.equal(after[k], before[k])]
    assert changed, "no new unit changed"
    x = torch.randn(64, *arch[1])
    with torch.no_grad():
        assert torch.equal(model.eval()(x, 0), pretrained(x, 0))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0, 0.1])
def test_parameter_counts_follow_the_ratio(ratio):
    name, shape, params = "mlp", (1, 8, 8), {"hidden": [40, 20], "batchnorm": True}
    model, _ = _expanded(name, shape, params, _pretrained(name, shape, params, steps=0), ratio=ratio)
    bb: ExpandedBackbone = model.backbone
    n_in, m_in, expected = 64, 0, 0
    for layer, grow in zip(bb.body, bb.grow):
        if isinstance(layer, nn.Linear):
            n_out = layer.out_features
            m_out = math.ceil(ratio * n_out)
            assert isinstance(grow, GrowLayer) and grow.new_out == m_out
            # W' = [[W_oo, 0], [W_no, W_nn]]: (n+m)(n_in+m_in) entries minus the absent zero block n x m_in
            full = (n_out + m_out) * (n_in + m_in) - n_out * m_in
            assert layer.weight.numel() + grow.from_old.weight.numel() + (
                grow.from_new.weight.numel() if grow.from_new is not None else 0) == full
            expected += m_out * (n_in + m_in) + m_out  # new rows and their biases
            n_in, m_in = n_out, m_out
        elif isinstance(layer, nn.BatchNorm1d):
            assert grow.num_features == m_in
            expected += 2 * m_in
    assert sum(p.numel() for p in bb.grow.parameters()) == expected
    assert bb.new_dim == math.ceil(ratio * 20) and bb.feature_dim == 20 + bb.new_dim


def test_two_step_is_switchable():
    def phases(**params):
        model = TransferModel(build_backbone("mlp", (1, 8, 8), {"hidden": [16]}), [5, 3])
        s = make_strategy("expanse", params, epochs=6, lr=0.1)
        s.build(model, [TaskInfo(0, "s", 5, list(range(5))), TaskInfo(1, "t", 3, [0, 1, 2])])
        return [(p.name, p.epochs, p.augment is not None) for p in s.phases(model, TaskInfo(1, "t", 3, [0, 1, 2]))]

    assert phases() == [("step1_clean", 3, False), ("step2_augmented", 3, True)]
    assert phases(step1=False) == [("step2_augmented", 6, True)]
    assert phases(step2=False) == [("step1_clean", 6, False)]
    assert phases(step1_epochs=2, step2_epochs=5) == [("step1_clean", 2, False), ("step2_augmented", 5, True)]


@pytest.mark.parametrize("params, field", [({"ratio": 0}, "ratio"), ({"ratio": -0.5}, "ratio"),
                                           ({"step1": False, "step2": False}, "step1")])
def test_bad_params_are_config_errors(tiny_config, params, field):
    with pytest.raises(ConfigError, match=field):
        load_config(tiny_config(strategies=[{"name": "expanse", "params": params}]))


def test_unsupported_backbone_fails_before_ray(tiny_config, workdir):
    cfg = load_config(tiny_config(backbone={"name": "resnet", "params": {"widths": [4]}}, strategies=["expanse"]))
    with pytest.raises(ConfigError, match="expanse does not support backbone 'resnet'"):
        preflight(cfg)


@pytest.mark.e2e
@pytest.mark.slow  # minutes on 2 cores: outside CI's budget, run by `make test-all`
def test_expanse_end_to_end_zero3(ray_session, workdir, tiny_config, tmp_path_factory):
    """Through the platform (2 workers, DeepSpeed ZeRO-3 on CPU): the source accuracy after transfer equals the
    pretrained one exactly, the pretrained weights (BatchNorm statistics included) are bit-identical in the exported
    checkpoint, and the target is learned."""
    # The same pre-training as tests/test_trajectory_transfer.py's end-to-end test, in a session-wide storage
    # folder: whichever runs second reuses the trajectory (CI time).
    cfg = tiny_config(backbone={"name": "mlp", "params": {"hidden": [32], "batchnorm": True}},
                      pretrain={"epochs": 2, "checkpoint_every": 2, "lr": 0.05, "batch_size": 64,
                                "optimizer": "sgd"},
                      train={"epochs": 2, "lr": 0.01, "batch_size": 64},
                      storage=str(tmp_path_factory.getbasetemp() / "expanse_trajectory_runs"),
                      strategies=[{"name": "expanse", "params": {"ratio": 0.5}}], deepspeed={"zero_stage": 3})
    result = forgetless.compare(cfg)
    r = result["expanse"]
    R = r.accuracy_matrix
    assert R[1][0] == R[0][0]  # source test accuracy after == before, exactly
    assert R[1][1] > 0.5  # 5 target classes: well above chance
    assert [p["phase"] for p in r.phase_log] == ["step1_clean", "step2_augmented"]
    pretrained = load_torch_file(result.trajectory.final().uri)
    trained = load_torch_file(f"{r.checkpoint_uri}/model.pt")
    for k, v in pretrained.items():
        if k.startswith("backbone.") or k.startswith("heads.t0."):
            assert torch.equal(trained[k], v), k
    assert any(k.startswith("backbone.grow.") for k in trained)
