"""trajectory_transfer: learning transfer, GMT / FGMT (Chijiwa, "Transferring Learning Trajectories of Neural
Networks", arXiv 2305.14122, ICLR 2024).

Given the source pre-training trajectory θ₁⁰ … θ₁ᵀ of one initialisation and another initialisation θ₂⁰, synthesise
θ₂ᵗ = θ₂⁰ + π(θ₁ᵗ − θ₁⁰) without training, π a permutation of hidden units chosen so that the permuted source gradients
match the target's gradients along the trajectory:

  π ← identity; for s = 1..T:
    θ₂^{s−1} = θ₂⁰ + π(θ₁^{s−1} − θ₁⁰)
    on the same mini-batch: g₁ = ∇L(θ₁^{s−1}), g₂ = ∇L(θ₂^{s−1})
      FGMT: append (g₁, g₂) to a cache; GMT: recompute the pairs of every t < s with the current π (O(T²) gradients)
    π = argmax Σ_pairs ⟨g₂, π(g₁)⟩ (coordinate descent over permutation groups, linear assignment per group)
    θ₂ˢ = θ₂⁰ + π(θ₁ˢ − θ₁⁰), BatchNorm statistics recomputed, validation accuracy recorded; the best step is kept.

Baselines: `naive` (π = identity), `oracle` (θ₂ trained for real, then π = weight matching of the real update θ₂ᵀ − θ₂⁰
to θ₁ᵀ − θ₁⁰), and `none` (θ₂⁰ itself, to measure training from scratch at the same initialisation).

In this platform the trajectory is the source task's pre-training (stop points saved by `pretrain`); the transferred
weights replace the pre-trained backbone and source head before the target stages, so row 0 of the accuracy matrix is
the transferred model's source accuracy, and the target stages then train from the best transferred point.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from forgetless.strategies import register
from forgetless.strategies.base import (ParamGroup, Phase, PrepareContext, Strategy, StrategyParams, TaskInfo,
                                        backbone_params, head_params)
from forgetless.strategies.permutations import (PermutationSpec, Perms, State, apply_permutation, identity, spec_for,
                                                weight_matching)

Method = Literal["gmt", "fgmt", "naive", "oracle", "none"]


# ---------------------------------------------------------------------------------------------------------------------
# the algorithm, independent of the platform


def schedule(T: int, kind: Literal["linear", "cosine"]) -> list[float]:
    """λ_0..λ_T with λ_0 = 0 and λ_T = 1: θ₁ᵗ = θ₁⁰ + λ_t (θ₁ᵀ − θ₁⁰).

    linear: t/T (the paper's default, found the more stable). cosine: (1 − cos(π t/T)) / 2, this project's reading of
    the official code's cosine-shaped option: small steps at both ends, where the loss changes fastest and settles.
    """
    if T < 1:
        raise ValueError("the trajectory needs at least one step (T >= 1)")
    if kind == "linear":
        return [t / T for t in range(T + 1)]
    return [(1.0 - math.cos(math.pi * t / T)) / 2.0 for t in range(T + 1)]


def interpolated_trajectory(theta_0: State, theta_T: State, lambdas: list[float]) -> list[State]:
    return [{k: theta_0[k] + lam * (theta_T[k] - theta_0[k]) for k in theta_0} for lam in lambdas]


def check_compatible(theta1: State, theta2: State, what: str = "θ₂⁰") -> None:
    """Same entries, same shapes: otherwise no permutation can map one network onto the other."""
    missing = [k for k in theta1 if k not in theta2]
    if missing:
        raise ValueError(f"{what} lacks {len(missing)} parameter(s) of the source trajectory, e.g. {missing[:3]}; "
                         f"it must be the same architecture as the pre-trained model")
    for k, v in theta1.items():
        if tuple(theta2[k].shape) != tuple(v.shape):
            raise ValueError(f"{what}: parameter {k!r} has shape {tuple(theta2[k].shape)} but the source trajectory "
                             f"has {tuple(v.shape)}; θ₁ and θ₂ must be the same architecture with the same widths")


def check_stop_points(epochs: list[int], final_epoch: int) -> None:
    """The trajectory must start at the initialisation θ₁⁰ (epoch 0) and end at the trained θ₁ᵀ (the last epoch)."""
    if 0 not in epochs:
        raise ValueError(f"the pre-training trajectory has no stop point at epoch 0 (θ₁⁰); it has {sorted(epochs)}")
    if final_epoch not in epochs:
        raise ValueError(f"the pre-training trajectory has no stop point at its final epoch {final_epoch} (θ₁ᵀ); it "
                         f"has {sorted(epochs)}: re-run the pre-training (delete its trajectory.json) so it completes")


@dataclass
class TransferResult:
    method: str
    val_acc: list[float]  # validation accuracy of θ₂ᵗ for t = 0..T (no training)
    best_step: int  # argmax over t = 1..T
    best_state: State
    perms: Perms
    gradients: int = 0  # gradient evaluations (each pair is two)
    pairs_computed: int = 0
    cached_pairs: int = 0
    seconds: float = 0.0  # everything but the validation evaluations
    eval_seconds: float = 0.0
    log: list[dict] = field(default_factory=list)


def learning_transfer(theta1: list[State], theta2_0: State, spec: PermutationSpec, method: str,
                      gradient: Callable[[State, int], State], evaluate: Callable[[State], float],
                      perms: Perms | None = None, max_sweeps: int = 100, seed: int = 0,
                      on_step: Callable[[int, float], None] | None = None) -> TransferResult:
    """Transfer the trajectory `theta1` (θ₁⁰..θ₁ᵀ, parameters only) to `theta2_0`.

    `gradient(state, batch_id)`: the training-loss gradient at `state`; equal ids mean the same mini-batch.
    `evaluate(state)`: validation accuracy of `state` (BatchNorm statistics recomputed by the caller).
    `perms`: the fixed permutation of `oracle` (ignored otherwise).
    """
    if len(theta1) < 2:
        raise ValueError("the trajectory needs θ₁⁰ and θ₁ᵀ at least")
    check_compatible(theta1[0], theta2_0)
    T = len(theta1) - 1
    spec = spec.restricted(theta1[0].keys())
    gen = torch.Generator().manual_seed(seed)
    deltas = [{k: th[k] - theta1[0][k] for k in th} for th in theta1]

    def at(t: int, p: Perms) -> State:
        moved = apply_permutation(spec, p, deltas[t])
        return {k: theta2_0[k] + moved[k] for k in theta2_0}

    if method in ("naive", "gmt", "fgmt"):
        perms = identity(spec)
    elif method == "oracle":
        if perms is None:
            raise ValueError("oracle needs the permutation found by matching a real training of θ₂")
    else:
        raise ValueError(f"unknown learning-transfer method {method!r}")
    res = TransferResult(method, [], 0, {}, perms)
    t_start = time.perf_counter()
    batch_id = 0
    cache: list[tuple[State, State]] = []

    def timed_eval(t: int, state: State) -> float:
        t0 = time.perf_counter()
        acc = evaluate(state)
        res.eval_seconds += time.perf_counter() - t0
        res.val_acc.append(acc)
        res.log.append({"t": t, "val_acc": acc})
        if on_step is not None:
            on_step(t, acc)
        return acc

    timed_eval(0, dict(theta2_0))
    best_acc = -1.0  # the best step is chosen among t >= 1 (t = 0 is θ₂⁰ itself)
    for s in range(1, T + 1):
        if method in ("gmt", "fgmt"):
            todo = list(range(s)) if method == "gmt" else [s - 1]
            fresh = []
            for t in todo:
                # One mini-batch for both networks: the pair compares the two gradients of the same loss.
                g1 = gradient(theta1[t], batch_id)
                g2 = gradient(at(t, perms), batch_id)
                batch_id += 1
                fresh.append((g2, g1))  # (a, b): π permutes the source gradient g₁ to align with g₂
            res.gradients += 2 * len(todo)
            res.pairs_computed += len(todo)
            if method == "fgmt":
                cache.extend(fresh)
                pairs = cache
            else:
                pairs = fresh
            perms = weight_matching(spec, pairs, init=perms, max_sweeps=max_sweeps, generator=gen)
        state = at(s, perms)
        acc = timed_eval(s, state)
        if acc > best_acc:
            best_acc, res.best_step, res.best_state = acc, s, state
    res.perms = perms
    res.cached_pairs = len(cache)
    res.seconds = time.perf_counter() - t_start - res.eval_seconds
    return res


# ---------------------------------------------------------------------------------------------------------------------
# the strategy


class TrajectoryTransferParams(StrategyParams):
    method: Method = Field("gmt", description="gmt | fgmt | naive (π = identity) | oracle (real training + matching) "
                                              "| none (θ₂⁰ itself, the train-from-scratch reference)")
    steps: int = Field(5, ge=1, le=200, description="T: steps along the trajectory (paper: MNIST MLP 5, Conv8 30)")
    schedule: Literal["linear", "cosine", "checkpoints"] = Field(
        "linear", description="θ₁ᵗ on the line θ₁⁰→θ₁ᵀ (linear/cosine), or the real stop points (checkpoints)")
    batch_size: int = Field(128, gt=0, description="mini-batch of each gradient (global, split over the workers)")
    bn_batches: int = Field(10, ge=1, description="training mini-batches to recompute BatchNorm statistics")
    max_sweeps: int = Field(100, ge=1, description="coordinate-descent sweeps per matching (stops at no gain)")
    theta2_seed: int = Field(1, description="θ₂⁰ = a fresh initialisation with this seed ...")
    theta2_weights: str | None = Field(None, description="... or a checkpoint (path or s3://) of the same architecture")
    oracle_epochs: int | None = Field(None, gt=0, description="oracle: epochs of real training (default: pretrain's)")
    continue_training: Literal["finetune", "linear_probe", "none"] = Field(
        "finetune", description="what the target stages train, starting from the best transferred point")
    seed: int = Field(0, description="mini-batch draws and the order of permutation groups")

    @model_validator(mode="after")
    def _checkpoints_steps(self) -> "TrajectoryTransferParams":
        if self.schedule == "checkpoints" and "steps" in self.model_fields_set:
            raise ValueError("steps: with schedule 'checkpoints' the steps are the pre-training's stop points; "
                             "remove steps (or use schedule linear/cosine)")
        return self


def _parameter_keys(model: nn.Module) -> list[str]:
    """θ of the transfer: the backbone and the source head (the part the source pre-training trained)."""
    return [k for k, _ in model.named_parameters() if k.startswith("backbone.") or k.startswith("heads.t0.")]


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@register
class TrajectoryTransfer(Strategy):
    name = "trajectory_transfer"
    paper = "Chijiwa, Transferring Learning Trajectories of Neural Networks (ICLR 2024, arXiv 2305.14122)"
    fidelity = "confirmed"
    Config = TrajectoryTransferParams
    needs_trajectory = True

    # -- checks before Ray starts -------------------------------------------------------------------------------------
    def check(self, cfg, tasks, load_weights) -> None:
        from forgetless.backbones import TransferModel, build_backbone

        p: TrajectoryTransferParams = self.params
        if cfg.backbone.weights:
            raise ValueError("trajectory_transfer needs a source pre-training from scratch (θ₁⁰ → θ₁ᵀ); with "
                             "backbone.weights set only the source head is trained; remove backbone.weights")
        init_seed = cfg.pretrain.init_seed if cfg.pretrain.init_seed is not None else cfg.seed
        if p.theta2_weights is None and p.theta2_seed == init_seed and p.method != "none":
            raise ValueError(f"theta2_seed ({p.theta2_seed}) equals the pre-training's init seed, so θ₂⁰ would be "
                             f"θ₁⁰; choose another theta2_seed")
        if p.schedule == "checkpoints" and cfg.pretrain.epochs // cfg.pretrain.checkpoint_every < 2:
            raise ValueError("schedule 'checkpoints' needs at least 2 stop points after epoch 0; lower "
                             "pretrain.checkpoint_every")
        torch.manual_seed(0)
        model = TransferModel(build_backbone(cfg.backbone.name, tuple(tasks[0].input_shape), cfg.backbone.params),
                              [t.num_classes for t in tasks])
        spec_for(model)  # raises UnsupportedArchitecture naming what has no permutation spec
        if p.theta2_weights is not None:
            theta2 = _theta2_entries(load_weights(p.theta2_weights))
            theta1 = {k: v for k, v in model.state_dict().items()
                      if k in set(_parameter_keys(model)) and (k.startswith("backbone.") or k in theta2)}
            check_compatible(theta1, theta2, f"theta2_weights {p.theta2_weights!r}")

    # -- synthesise θ₂ before the target stages -----------------------------------------------------------------------
    def prepare(self, model, ctx: PrepareContext) -> None:
        p: TrajectoryTransferParams = self.params
        keys = _parameter_keys(model)
        if not ctx.trajectory:
            raise ValueError("trajectory_transfer needs the source pre-training trajectory; the platform gave none")
        check_stop_points([e for e, _ in ctx.trajectory], ctx.final_epoch)
        states = sorted(ctx.trajectory, key=lambda es: es[0])
        states = [{k: sd[k].float().cpu() for k in keys} for e, sd in states if e <= ctx.final_epoch]
        for sd in states[1:]:
            check_compatible(states[0], sd, "a stop point of the trajectory")
        spec = spec_for(model).restricted(keys)
        scratch = copy.deepcopy(model).to(ctx.device)
        theta2_0 = self._theta2_init(scratch, keys, ctx)
        check_compatible(states[0], theta2_0)
        if p.schedule == "checkpoints":
            theta1 = states
        else:
            theta1 = interpolated_trajectory(states[0], states[-1], schedule(p.steps, p.schedule))

        x_train, y_train = ctx.source_train
        gen_seed = p.seed * 1_000_003

        def batch(batch_id: int) -> tuple[torch.Tensor, torch.Tensor]:
            # The same global mini-batch on every rank; each rank takes its slice, gradients are then averaged.
            g = torch.Generator().manual_seed(gen_seed + batch_id)
            idx = torch.randperm(len(x_train), generator=g)[: p.batch_size]
            per_rank = max(1, len(idx) // ctx.world)
            mine = idx[ctx.rank * per_rank: (ctx.rank + 1) * per_rank]
            return x_train[mine].to(ctx.device), y_train[mine].to(ctx.device)

        params = dict(scratch.named_parameters())
        has_bn = _has_batchnorm(scratch)

        def load(state: State) -> None:
            with torch.no_grad():
                for k in keys:
                    params[k].copy_(state[k])

        def gradient(state: State, batch_id: int) -> State:
            load(state)
            # Training mode (BatchNorm on batch statistics, as in the training that made the trajectory); dropout
            # off, so both networks compute the same function of the batch.
            scratch.train()
            for m in scratch.modules():
                if isinstance(m, nn.Dropout):
                    m.eval()
            x, y = batch(batch_id)
            loss = F.cross_entropy(scratch(x, 0), y)
            grads = torch.autograd.grad(loss, [params[k] for k in keys])
            flat = ctx.all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
            out, i = {}, 0
            for k in keys:
                n = params[k].numel()
                out[k] = flat[i: i + n].view_as(params[k]).detach().cpu()
                i += n
            return out

        def evaluate(state: State) -> float:
            load(state)
            if has_bn:
                recompute_batchnorm(scratch, [batch(10**6 + b) for b in range(p.bn_batches)], ctx.all_reduce_mean)
            return ctx.source_accuracy(scratch)

        perms = None
        t0 = time.perf_counter()
        if p.method == "none":
            acc = evaluate(theta2_0)
            ctx.log(f"trajectory_transfer none: θ₂⁰ source val acc {acc:.4f}")
            ctx.log_metrics({"transfer/val_acc": acc}, 0)
            load(theta2_0)
            self._install(model, scratch, keys)
            return
        if p.method == "oracle":
            theta2_T = train_for_real(scratch, theta2_0, keys, ctx, p.oracle_epochs, p.seed)
            delta1 = {k: states[-1][k] - states[0][k] for k in keys}
            delta2 = {k: theta2_T[k] - theta2_0[k] for k in keys}
            perms = weight_matching(spec, [(delta2, delta1)], max_sweeps=p.max_sweeps,
                                    generator=torch.Generator().manual_seed(p.seed))
        oracle_seconds = time.perf_counter() - t0
        res = learning_transfer(
            theta1, theta2_0, spec, p.method, gradient, evaluate, perms=perms, max_sweeps=p.max_sweeps, seed=p.seed,
            on_step=lambda t, acc: ctx.log_metrics({"transfer/val_acc": acc}, t))
        res.seconds += oracle_seconds
        ctx.log(f"trajectory_transfer {p.method}: source val acc along t {[round(a, 4) for a in res.val_acc]}, "
                f"best t={res.best_step}; {res.gradients} gradients, {res.seconds:.2f}s (+{res.eval_seconds:.2f}s "
                f"evaluation)")
        ctx.log_metrics({"transfer/best_step": float(res.best_step), "transfer/best_val_acc": max(res.val_acc[1:]),
                         "transfer/gradients": float(res.gradients), "transfer/seconds": res.seconds,
                         "transfer/eval_seconds": res.eval_seconds}, len(theta1) - 1)
        self.result = res
        evaluate(res.best_state)  # leaves the best θ₂ in `scratch`, with its BatchNorm statistics
        self._install(model, scratch, keys)

    def _theta2_init(self, scratch: nn.Module, keys: list[str], ctx: PrepareContext) -> State:
        p: TrajectoryTransferParams = self.params
        # A fresh initialisation with another seed, drawn the way the modules draw their own (same on every rank).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.theta2_seed)
            for m in list(scratch.backbone.modules()) + [scratch.heads["t0"]]:
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        if p.theta2_weights is not None:
            # ... or a given checkpoint (its source head too when it has one; else the fresh head above).
            scratch.load_state_dict(_theta2_entries(ctx.load_weights(p.theta2_weights)), strict=False)
        return {k: v.detach().cpu().clone() for k, v in scratch.state_dict().items() if k in set(keys)}

    @staticmethod
    def _install(model: nn.Module, scratch: nn.Module, keys: list[str]) -> None:
        """The transferred backbone and source head (with BatchNorm statistics) replace the pre-trained ones."""
        wanted = {k: v for k, v in scratch.state_dict().items()
                  if k.startswith("backbone.") or k.startswith("heads.t0.")}
        model.load_state_dict(wanted, strict=False)

    # -- the target stages ---------------------------------------------------------------------------------------------
    def phases(self, model, task: TaskInfo) -> list[Phase]:
        mode = self.params.continue_training
        if mode == "none":
            return []
        if mode == "linear_probe":
            return [Phase("probe", self.epochs, [ParamGroup("head", head_params(model, task), self.lr)],
                          eval_modules=[model.backbone])]
        return [Phase("finetune", self.epochs, [ParamGroup("backbone", backbone_params(model), self.lr),
                                                ParamGroup("head", head_params(model, task), self.lr)])]

    def tags(self) -> dict[str, str]:
        p = self.params
        return {**super().tags(), "trajectory_transfer.method": p.method,
                "trajectory_transfer.reading": "source trajectory -> new init, selected on source val; then target"}


def _theta2_entries(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone (and source head, if any) of a TransferModel state dict, or of a plain backbone state dict."""
    if not any(k.startswith("backbone.") for k in sd):
        sd = {f"backbone.{k}": v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if k.startswith("backbone.") or k.startswith("heads.t0.")}


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                        all_reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Reset every BatchNorm's running statistics and re-estimate them (a plain average over the batches, spread
    over the ranks) for the current weights: interpolated or permuted weights make the old statistics meaningless."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    for x, _ in batches:
        model.backbone(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
        all_reduce_mean(m.running_mean)
        all_reduce_mean(m.running_var)
    model.train(was_training)


def train_for_real(scratch: nn.Module, theta2_0: State, keys: list[str], ctx: PrepareContext,
                   epochs: int | None, seed: int) -> State:
    """The oracle's real training of θ₂ on the source with the pre-training's recipe (optimizer, lr, batch, epochs);
    data-parallel by hand: each rank's gradient on its slice is averaged before an identical step on every rank."""
    opt_cfg = ctx.pretrain
    params = dict(scratch.named_parameters())
    with torch.no_grad():
        for k in keys:
            params[k].copy_(theta2_0[k].to(params[k].device))
    trainable = [params[k] for k in keys]
    if opt_cfg.optimizer == "sgd":
        opt = torch.optim.SGD(trainable, lr=opt_cfg.lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay)
    else:
        cls = torch.optim.Adam if opt_cfg.optimizer == "adam" else torch.optim.AdamW
        opt = cls(trainable, lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay)
    x, y = ctx.source_train
    scratch.train()
    for epoch in range(epochs or opt_cfg.epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        per_rank = len(order) // ctx.world
        mine = order[ctx.rank * per_rank: (ctx.rank + 1) * per_rank]
        for i in range(0, len(mine), opt_cfg.batch_size):
            b = mine[i: i + opt_cfg.batch_size]
            loss = F.cross_entropy(scratch(x[b].to(ctx.device), 0), y[b].to(ctx.device))
            grads = torch.autograd.grad(loss, trainable)
            for prm, g in zip(trainable, grads):
                prm.grad = ctx.all_reduce_mean(g.detach().clone())
            opt.step()
    return {k: params[k].detach().clone() for k in keys}


def local_context(source_train: tuple[torch.Tensor, torch.Tensor], source_val: tuple[torch.Tensor, torch.Tensor],
                  trajectory: list[tuple[int, State]], pretrain, log=print) -> PrepareContext:
    """A one-process PrepareContext (no Ray, no collectives), for scripts, benchmarks and unit tests."""
    metrics: list[tuple[int, dict[str, float]]] = []

    @torch.no_grad()
    def source_accuracy(model: nn.Module) -> float:
        was = model.training
        model.eval()
        x, y = source_val
        acc = float((model(x, 0).argmax(1) == y).float().mean())
        model.train(was)
        return acc

    ctx = PrepareContext(rank=0, world=1, device=torch.device("cpu"), source_train=source_train,
                         all_reduce_mean=lambda t: t, source_accuracy=source_accuracy, log=log,
                         log_metrics=lambda m, step: metrics.append((step, dict(m))),
                         load_weights=lambda uri: torch.load(uri, map_location="cpu", weights_only=True),
                         pretrain=pretrain, final_epoch=max(e for e, _ in trajectory), trajectory=trajectory)
    ctx.metrics = metrics  # what the strategy logged, for inspection
    return ctx
