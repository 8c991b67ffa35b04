"""Learning transfer (GMT / FGMT): permutation specs, weight matching, the algorithm's bookkeeping, bad input, and one
end-to-end run through the platform."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import forgetless
from forgetless.backbones import TransferModel, build_backbone, register_backbone
from forgetless.config import ConfigError, PretrainConfig, TaskConfig, load_config
from forgetless.data import build_task
from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.worker.model_io import load_torch_file
from forgetless.platform.analysis.results import StopPoint, Trajectory
from forgetless.platform.driver.preflight import preflight
from forgetless.platform.driver.fits import trajectory_stop_points
from forgetless.strategies import make_strategy
from forgetless.strategies import permutations as P
from forgetless.strategies.trajectory_transfer import learning_transfer, local_context


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


ARCHS = [
    ("mlp", (1, 8, 8), {"hidden": [24, 16]}),
    ("mlp", (1, 8, 8), {"hidden": [24, 16], "batchnorm": True}),
    ("cnn2d", (1, 8, 8), {"channels": [6, 10]}),
    ("resnet", (1, 8, 8), {"widths": [6, 10], "blocks_per_stage": 2}),
    ("resnet", (1, 40), {"widths": [6, 10]}),
]
IDS = ["mlp", "mlp_bn", "cnn2d", "resnet2d", "resnet1d"]


def _model(name, shape, params, seed=0):
    torch.manual_seed(seed)
    model = TransferModel(build_backbone(name, shape, params), [5, 3], seed=seed)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that permuting them is tested too
        for _ in range(3):
            model(torch.randn(32, *shape), 0)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS, ids=IDS)
def test_random_permutation_leaves_outputs_unchanged(arch):
    model = _model(*arch)
    spec = P.spec_for(model)
    assert set(spec.axes) == set(model.state_dict())  # every entry is described
    perms = P.random_permutation(spec, torch.Generator().manual_seed(1))
    assert any(not torch.equal(v, torch.arange(len(v))) for v in perms.values())
    permuted = _model(*arch, seed=5)
    permuted.load_state_dict(P.apply_permutation(spec, perms, model.state_dict()))
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), permuted.state_dict().values()))
    x = torch.randn(16, *arch[1])
    with torch.no_grad():
        for task in (0, 1):
            torch.testing.assert_close(permuted(x, task), model(x, task), rtol=1e-5, atol=1e-5)


def test_a_wrong_spec_would_be_caught():
    """The check above has teeth: permuting a residual stream's layers independently changes the outputs."""
    arch = ARCHS[3]
    model = _model(*arch)
    spec = P.spec_for(model)
    broken = P.PermutationSpec(dict(spec.axes), dict(spec.sizes))
    key = "backbone.stages.0.0.conv2.weight"
    broken.axes[key] = ("rogue",) + spec.axes[key][1:]
    broken.axes["backbone.stages.0.0.bn2.weight"] = ("rogue",)
    broken.axes["backbone.stages.0.0.bn2.bias"] = ("rogue",)
    broken.sizes["rogue"] = spec.sizes[spec.axes[key][0]]
    perms = P.random_permutation(broken, torch.Generator().manual_seed(1))
    permuted = _model(*arch, seed=5)
    permuted.load_state_dict(P.apply_permutation(broken, perms, model.state_dict()))
    x = torch.randn(16, *arch[1])
    with torch.no_grad():
        assert not torch.allclose(permuted(x, 0), model(x, 0), atol=1e-4)


@pytest.mark.parametrize("arch", [ARCHS[0], ARCHS[2], ARCHS[3]], ids=["mlp", "cnn2d", "resnet2d"])
def test_weight_matching_recovers_a_known_permutation(arch):
    model = _model(*arch)
    spec = P.spec_for(model)
    state = model.state_dict()
    perms = P.random_permutation(spec, torch.Generator().manual_seed(3))
    shuffled = P.apply_permutation(spec, perms, state)
    found = P.weight_matching(spec, [(state, shuffled)], generator=torch.Generator().manual_seed(0))
    expected = P.inverse(perms)
    for p in spec.sizes:
        assert torch.equal(found[p], expected[p]), p
    restored = P.apply_permutation(spec, found, shuffled)
    assert all(torch.equal(restored[k], v) for k, v in state.items())


# -- the algorithm ---------------------------------------------------------------------------------------------------


def _digits_trajectory(epochs=6, hidden=(64, 64)):
    """A real source trajectory: an MLP trained with SGD on the digits' training split (θ₁⁰ and θ₁ᵀ)."""
    task = build_task(TaskConfig(dataset="digits"))
    pre = PretrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=64, epochs=epochs, checkpoint_every=epochs)
    torch.manual_seed(0)
    model = TransferModel(build_backbone("mlp", (1, 8, 8), {"hidden": list(hidden)}), [10], seed=0)
    traj = [(0, copy.deepcopy(model.state_dict()))]
    opt = torch.optim.SGD(model.parameters(), lr=pre.lr, momentum=pre.momentum)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(len(task.x_train), generator=g)
        for i in range(0, len(order), pre.batch_size):
            b = order[i: i + pre.batch_size]
            opt.zero_grad()
            F.cross_entropy(model(task.x_train[b], 0), task.y_train[b]).backward()
            opt.step()
    traj.append((epochs, copy.deepcopy(model.state_dict())))
    return task, pre, model, traj


@pytest.fixture(scope="module")
def digits_trajectory():
    return _digits_trajectory()


def _transfer(digits_trajectory, **params):
    task, pre, model, traj = digits_trajectory
    ctx = local_context((task.x_train, task.y_train), (task.x_val, task.y_val), traj, pre, log=lambda s: None)
    strategy = make_strategy("trajectory_transfer", params, epochs=1, lr=0.01)
    target = copy.deepcopy(model)
    strategy.prepare(target, ctx)
    return strategy, target, ctx


def test_gmt_beats_naive_on_digits(digits_trajectory):
    """Without any training, the gradient-matched transfer is more accurate along the trajectory than the
    unpermuted one (both from the same θ₂⁰, over the same steps), and both beat chance (10 classes)."""
    gmt, model, ctx = _transfer(digits_trajectory, method="gmt", steps=3)
    naive, _, _ = _transfer(digits_trajectory, method="naive", steps=3)
    g, n = gmt.result.val_acc[1:], naive.result.val_acc[1:]
    assert gmt.result.val_acc[0] == naive.result.val_acc[0]  # the same θ₂⁰
    assert sum(g) / len(g) > sum(n) / len(n) + 0.05, (g, n)
    assert max(g) > max(n) > 0.2
    # the model now holds the point chosen on the selection split (held out of the training data, not the validation
    # split it reports on): its source validation accuracy is the one recorded at that step
    res = gmt.result
    assert res.best_step == 1 + max(range(3), key=lambda i: res.selection_acc[1 + i])
    assert ctx.source_accuracy(model) == pytest.approx(res.val_acc[res.best_step])
    assert [step for step, m in ctx.metrics if "transfer/val_acc" in m] == [0, 1, 2, 3]
    assert all("transfer/selection_acc" in m for step, m in ctx.metrics if "transfer/val_acc" in m)


def test_fgmt_caches_pairs_and_gmt_recomputes_them():
    torch.manual_seed(0)
    model = TransferModel(build_backbone("mlp", (1, 4, 4), {"hidden": [8]}), [3])
    keys = [k for k, _ in model.named_parameters()]
    spec = P.spec_for(model).restricted(keys)
    theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    thetaT = {k: v + 0.1 * torch.randn_like(v) for k, v in theta0.items()}
    T = 4
    theta1 = [{k: theta0[k] + t / T * (thetaT[k] - theta0[k]) for k in keys} for t in range(T + 1)]
    torch.manual_seed(1)
    theta2_0 = {k: torch.randn_like(v) for k, v in theta0.items()}
    x, y = torch.randn(32, 1, 4, 4), torch.randint(0, 3, (32,))

    def run(method):
        calls = []

        def gradient(state, batch_id):
            calls.append((next((t for t, th in enumerate(theta1) if th is state), None), batch_id))
            params = {k: v.clone().requires_grad_(True) for k, v in state.items()}
            logits = torch.func.functional_call(model, params, (x, 0))
            return dict(zip(params, torch.autograd.grad(F.cross_entropy(logits, y), list(params.values()))))

        res = learning_transfer(theta1, theta2_0, spec, method, gradient, lambda s: 0.0)
        return res, calls

    fgmt, calls = run("fgmt")
    assert fgmt.cached_pairs == T and fgmt.pairs_computed == T and fgmt.gradients == 2 * T == len(calls)
    assert [t for t, _ in calls if t is not None] == list(range(T))  # θ₁ᵗ once each: pairs come from the cache
    gmt, calls = run("gmt")
    assert gmt.cached_pairs == 0 and gmt.pairs_computed == T * (T + 1) // 2 and gmt.gradients == T * (T + 1)
    source_points = [t for t, _ in calls if t is not None]
    assert source_points == [t for s in range(1, T + 1) for t in range(s)]  # step s recomputes every t < s
    # the two gradients of a pair always see the same mini-batch, and each pair a fresh one
    batch_ids = [b for _, b in calls]
    assert batch_ids[0::2] == batch_ids[1::2] and len(set(batch_ids)) == len(batch_ids) // 2
    naive, calls = run("naive")
    assert calls == [] and all(torch.equal(v, torch.arange(len(v))) for v in naive.perms.values())


# -- bad input -------------------------------------------------------------------------------------------------------


class _NoSpecNet(nn.Module):
    def __init__(self, input_shape, width: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU())
        self.feature_dim = width

    def forward(self, x):
        return self.net(x)


register_backbone("test_no_spec_net", _NoSpecNet)


def test_architecture_without_a_spec_is_a_clear_error(tiny_config, workdir):
    with pytest.raises(P.UnsupportedArchitecture, match="no permutation spec for backbone _NoSpecNet"):
        P.spec_for(TransferModel(_NoSpecNet((1, 8, 8)), [5]))
    cfg = load_config(tiny_config(backbone={"name": "test_no_spec_net"}, strategies=["trajectory_transfer"]))
    with pytest.raises(ConfigError, match=r"strategies\[trajectory_transfer\]: no permutation spec .*_NoSpecNet"):
        preflight(cfg)


def test_mismatched_theta2_shapes_fail_before_ray(tiny_config, workdir):
    other = TransferModel(build_backbone("mlp", (1, 8, 8), {"hidden": [48]}), [5])
    torch.save(other.state_dict(), workdir / "theta2.pt")
    cfg = load_config(tiny_config(strategies=[{"name": "trajectory_transfer",
                                               "params": {"theta2_weights": str(workdir / "theta2.pt")}}]))
    with pytest.raises(ConfigError, match=r"theta2_weights .*'backbone.body.1.weight' has shape \(48, 64\) but the "
                                          r"source trajectory has \(32, 64\)"):
        preflight(cfg)


def test_trajectory_without_its_final_point_fails_before_training(tiny_config, digits_trajectory):
    cfg = load_config(tiny_config(strategies=["trajectory_transfer"]))  # pretrain.epochs = 2
    partial = Trajectory("r", "/x", [StopPoint(0, "/x/e0/model.pt", None), StopPoint(1, "/x/e1/model.pt", 0.5)])
    with pytest.raises(ConfigError, match=r"no stop point θᵀ \(epoch 2\)"):
        trajectory_stop_points(cfg, cfg.strategies[0], partial)
    # the strategy itself refuses too (Python API use), before computing any gradient
    task, pre, model, traj = digits_trajectory
    ctx = local_context((task.x_train, task.y_train), (task.x_val, task.y_val), traj[:1], pre)
    ctx.final_epoch = pre.epochs
    with pytest.raises(ValueError, match="no stop point at its final epoch"):
        make_strategy("trajectory_transfer", {}, 1, 0.01).prepare(copy.deepcopy(model), ctx)
    assert ctx.metrics == []


def test_theta2_equal_to_theta1_and_backbone_weights_are_refused(tiny_config, workdir, tmp_path):
    with pytest.raises(ConfigError, match="theta2_seed"):
        preflight(load_config(tiny_config(strategies=[{"name": "trajectory_transfer",
                                                       "params": {"theta2_seed": 0}}])))
    torch.save(TransferModel(build_backbone("mlp", (1, 8, 8), {"hidden": [32]}), [5]).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match="pre-training from scratch"):
        preflight(load_config(tiny_config(backbone={"name": "mlp", "params": {"hidden": [32]},
                                                    "weights": str(tmp_path / "w.pt")},
                                          strategies=["trajectory_transfer"])))


# -- through the platform ----------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow  # minutes on 2 cores: outside CI's budget, run by `make test-all`
def test_trajectory_transfer_end_to_end(ray_session, workdir, tiny_config, tmp_path_factory):
    """Ray Train (2 workers, DeepSpeed ZeRO-2): the pre-training trajectory reaches the strategy, the transferred
    weights (not the pre-trained ones, BatchNorm statistics recomputed) start the target stage, and the transfer
    curve is in MLflow."""
    T = 2
    # The same pre-training as tests/test_expanse.py's end-to-end test (session-wide storage: one of them reuses it).
    cfg = tiny_config(backbone={"name": "mlp", "params": {"hidden": [32], "batchnorm": True}},
                      pretrain={"epochs": 2, "checkpoint_every": 2, "lr": 0.05, "batch_size": 64, "optimizer": "sgd"},
                      train={"epochs": 1, "lr": 0.01, "batch_size": 64},
                      storage=str(tmp_path_factory.getbasetemp() / "expanse_trajectory_runs"),
                      strategies=[{"name": "trajectory_transfer",
                                   "params": {"method": "gmt", "steps": T, "batch_size": 64}}])
    result = forgetless.compare(cfg)
    r = result["trajectory_transfer"]
    client = tracking.client(result.tracking_uri)
    history = client.get_metric_history(r.mlflow_run_id, "transfer/val_acc")
    assert sorted(m.step for m in history) == list(range(T + 1))
    chosen = int(client.get_metric_history(r.mlflow_run_id, "transfer/best_step")[0].value)
    best = next(m.value for m in history if m.step == chosen)  # t chosen on the selection split, reported on val
    assert best > 0.5  # 5 source classes, no training of θ₂: the transferred trajectory carries the knowledge
    # row 0 (before the target) is the transferred model, evaluated on the source's test split
    assert r.accuracy_matrix[0][0] > 0.5 and r.accuracy_matrix[1][1] > 0.5
    pretrained = load_torch_file(result.trajectory.final().uri)
    history0 = [h for h in r.history if h["phase"] == "before"][0]
    assert history0["acc"]["0"] == pytest.approx(best)  # the source val accuracy of the installed chosen point
    trained = load_torch_file(f"{r.checkpoint_uri}/model.pt")
    assert not torch.equal(trained["heads.t0.weight"], pretrained["heads.t0.weight"])


# -- t is chosen on a split of its own ---------------------------------------------------------------------------------


def test_selection_split_is_held_out_of_the_gradients():
    from forgetless.strategies.trajectory_transfer.training import selection_split

    fit, sel = selection_split(100, 0.1, seed=3)
    assert len(sel) == 10 and len(fit) == 90
    assert sorted(torch.cat([fit, sel]).tolist()) == list(range(100))  # disjoint, and together every sample
    assert torch.equal(selection_split(100, 0.1, seed=3)[1], sel)  # fixed by the seed
    assert len(selection_split(100, 0.0, seed=3)[1]) == 0 and len(selection_split(5, 0.01, seed=0)[1]) == 1


def test_t_is_chosen_on_the_selection_score_and_reported_on_validation():
    """When the selection split and the validation split disagree, t follows the selection score; the validation
    accuracy is recorded at every t (what is reported), not used for the choice."""
    torch.manual_seed(0)
    model = TransferModel(build_backbone("mlp", (1, 4, 4), {"hidden": [8]}), [3])
    keys = [k for k, _ in model.named_parameters()]
    spec = P.spec_for(model).restricted(keys)
    theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    theta1 = [{k: v + 0.01 * t for k, v in theta0.items()} for t in range(4)]
    selection = iter([0.1, 0.2, 0.9, 0.3])  # t = 2 selects best
    validation = iter([0.1, 0.8, 0.4, 0.7])  # t = 1 would, were t chosen on the split it is reported on
    seen = []
    res = learning_transfer(theta1, theta0, spec, "naive", lambda s, b: s, lambda s: next(selection),
                            validate=lambda: next(validation), on_step=lambda t, a, v: seen.append((t, a, v)))
    assert res.best_step == 2 and res.val_acc == [0.1, 0.8, 0.4, 0.7] and res.selection_acc == [0.1, 0.2, 0.9, 0.3]
    assert seen == [(0, 0.1, 0.1), (1, 0.2, 0.8), (2, 0.9, 0.4), (3, 0.3, 0.7)]
    same = learning_transfer(theta1, theta0, spec, "naive", lambda s, b: s, lambda s: 0.5)
    assert same.val_acc == same.selection_acc == [0.5] * 4  # no selection split: the score is the validation accuracy


def test_strategy_selects_on_held_out_training_data(digits_trajectory):
    """Through the strategy: its selection split is part of the training data (never the validation split), and the
    logged best validation accuracy is the one at the chosen t, not the maximum over t."""
    strategy, model, ctx = _transfer(digits_trajectory, method="naive", steps=3, selection_fraction=0.2)
    res = strategy.result
    task = digits_trajectory[0]
    assert res.selection_acc != res.val_acc  # two different splits
    best = [m for _, m in ctx.metrics if "transfer/best_val_acc" in m][0]
    assert best["transfer/best_val_acc"] == res.val_acc[res.best_step]
    assert best["transfer/best_selection_acc"] == max(res.selection_acc[1:])
    # t = 0 included: 4 selection scores, each a fraction of the held-out part's 20% of the training split
    n_sel = round(0.2 * len(task.x_train))
    assert all(abs(a * n_sel - round(a * n_sel)) < 1e-3 for a in res.selection_acc)  # (float32 means)
    plain, _, _ = _transfer(digits_trajectory, method="naive", steps=3, selection_fraction=0.0)
    assert plain.result.selection_acc == plain.result.val_acc  # the paper's protocol: chosen on validation
