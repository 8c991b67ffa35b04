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

Modules: `trajectory` (the schedule θ₁ᵗ, stop points, compatibility checks), `gmt` (the transfer loop), `training` (the
source task's gradients and accuracy on every rank, BatchNorm recompute, the oracle's real training), `context` (a
one-process PrepareContext for scripts and tests).
"""
from __future__ import annotations

import copy
import time
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from forgetless.backbones import TransferModel, build_backbone
from forgetless.strategies import register
from forgetless.strategies._phases import finetune_phase, probe_phase
from forgetless.strategies.base import Phase, PrepareContext, Strategy, StrategyParams, TaskInfo
from forgetless.strategies.permutations import PermutationSpec, Perms, State, spec_for, weight_matching
from forgetless.strategies.trajectory_transfer.context import local_context
from forgetless.strategies.trajectory_transfer.gmt import TransferResult, learning_transfer
from forgetless.strategies.trajectory_transfer.training import (SourceObjective, recompute_batchnorm,
                                                                train_for_real)
from forgetless.strategies.trajectory_transfer.trajectory import (check_compatible, interpolated_trajectory, schedule,
                                                                  trajectory_states)

Method = Literal["gmt", "fgmt", "naive", "oracle", "none"]

__all__ = ["Method", "TrajectoryTransfer", "TrajectoryTransferParams", "TransferResult", "check_compatible",
           "interpolated_trajectory", "learning_transfer", "local_context", "recompute_batchnorm", "schedule",
           "train_for_real"]


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
    selection_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="part of the source training data held out (not used for gradients) to "
        "choose the step t, so the source validation accuracy reported at t is not the score t was chosen on; 0: "
        "choose t on the source validation split (the paper's protocol, which inflates the reported value)")

    @model_validator(mode="after")
    def _checkpoints_steps(self) -> "TrajectoryTransferParams":
        if self.schedule == "checkpoints" and "steps" in self.model_fields_set:
            raise ValueError("steps: with schedule 'checkpoints' the steps are the pre-training's stop points; "
                             "remove steps (or use schedule linear/cosine)")
        return self


def _is_transferred(key: str) -> bool:
    """θ of the transfer: the backbone and the source head (the part the source pre-training trained)."""
    return key.startswith("backbone.") or key.startswith("heads.t0.")


def _parameter_keys(model: nn.Module) -> list[str]:
    return [k for k, _ in model.named_parameters() if _is_transferred(k)]


def _theta2_entries(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone (and source head, if any) of a TransferModel state dict, or of a plain backbone state dict."""
    if not any(k.startswith("backbone.") for k in sd):
        sd = {f"backbone.{k}": v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if _is_transferred(k)}


def _install(model: nn.Module, scratch: nn.Module) -> None:
    """The transferred backbone and source head (with BatchNorm statistics) replace the pre-trained ones."""
    model.load_state_dict({k: v for k, v in scratch.state_dict().items() if _is_transferred(k)}, strict=False)


def _log_result(ctx: PrepareContext, res: TransferResult, last_step: int) -> None:
    ctx.log(f"trajectory_transfer {res.method}: source val acc along t {[round(a, 4) for a in res.val_acc]}, "
            f"selection acc {[round(a, 4) for a in res.selection_acc]}, best t={res.best_step}; {res.gradients} "
            f"gradients, {res.seconds:.2f}s (+{res.eval_seconds:.2f}s evaluation)")
    # best_val_acc: the validation accuracy at the chosen t (chosen on selection_acc: a split of its own, unless
    # selection_fraction is 0)
    ctx.log_metrics({"transfer/best_step": float(res.best_step), "transfer/best_val_acc": res.val_acc[res.best_step],
                     "transfer/best_selection_acc": res.selection_acc[res.best_step],
                     "transfer/gradients": float(res.gradients), "transfer/seconds": res.seconds,
                     "transfer/eval_seconds": res.eval_seconds}, last_step)


@register
class TrajectoryTransfer(Strategy):
    name = "trajectory_transfer"
    paper = "Chijiwa, Transferring Learning Trajectories of Neural Networks (ICLR 2024, arXiv 2305.14122)"
    fidelity = "confirmed"
    Config = TrajectoryTransferParams
    needs_trajectory = True

    # -- checks before Ray starts -------------------------------------------------------------------------------------
    def check(self, cfg, tasks, load_weights) -> None:
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
        states = trajectory_states(ctx.trajectory, ctx.final_epoch, keys)
        spec = spec_for(model).restricted(keys)
        scratch = copy.deepcopy(model).to(ctx.device)
        theta2_0 = self._theta2_init(scratch, keys, ctx)
        check_compatible(states[0], theta2_0)
        source = SourceObjective(scratch, keys, ctx, p.batch_size, p.bn_batches, p.seed, p.selection_fraction)
        if p.method == "none":
            source.evaluate(theta2_0)  # (its BatchNorm statistics)
            acc = source.validation_accuracy()
            ctx.log(f"trajectory_transfer none: θ₂⁰ source val acc {acc:.4f}")
            ctx.log_metrics({"transfer/val_acc": acc}, 0)
            source.load(theta2_0)
        else:
            self.result = self._transfer(source, states, theta2_0, spec, ctx)
            source.evaluate(self.result.best_state)  # leaves the best θ₂ in `scratch`, with its BatchNorm statistics
        _install(model, scratch)

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

    def _transfer(self, source: SourceObjective, states: list[State], theta2_0: State, spec: PermutationSpec,
                  ctx: PrepareContext) -> TransferResult:
        p: TrajectoryTransferParams = self.params
        if p.schedule == "checkpoints":
            theta1 = states
        else:
            theta1 = interpolated_trajectory(states[0], states[-1], schedule(p.steps, p.schedule))
        t0 = time.perf_counter()
        perms = self._oracle_perms(source, states, theta2_0, spec, ctx) if p.method == "oracle" else None
        oracle_seconds = time.perf_counter() - t0
        res = learning_transfer(
            theta1, theta2_0, spec, p.method, source.gradient, source.evaluate, perms=perms, max_sweeps=p.max_sweeps,
            seed=p.seed, validate=source.validation_accuracy if len(source.selection_idx) else None,
            on_step=lambda t, score, val: ctx.log_metrics({"transfer/val_acc": val, "transfer/selection_acc": score},
                                                          t))
        res.seconds += oracle_seconds
        _log_result(ctx, res, len(theta1) - 1)
        return res

    def _oracle_perms(self, source: SourceObjective, states: list[State], theta2_0: State, spec: PermutationSpec,
                      ctx: PrepareContext) -> Perms:
        """π of the oracle: θ₂ trained for real, its update θ₂ᵀ − θ₂⁰ weight-matched to θ₁ᵀ − θ₁⁰."""
        p: TrajectoryTransferParams = self.params
        keys = source.keys
        theta2_T = train_for_real(source.scratch, theta2_0, keys, ctx, p.oracle_epochs, p.seed)
        delta1 = {k: states[-1][k] - states[0][k] for k in keys}
        delta2 = {k: theta2_T[k] - theta2_0[k] for k in keys}
        return weight_matching(spec, [(delta2, delta1)], max_sweeps=p.max_sweeps,
                               generator=torch.Generator().manual_seed(p.seed))

    # -- the target stages ---------------------------------------------------------------------------------------------
    def phases(self, model, task: TaskInfo) -> list[Phase]:
        mode = self.params.continue_training
        if mode == "none":
            return []
        if mode == "linear_probe":
            return [probe_phase(model, task, self.epochs, self.lr)]
        return [finetune_phase(model, task, self.epochs, self.lr, self.lr)]

    def tags(self) -> dict[str, str]:
        p = self.params
        return {**super().tags(), "trajectory_transfer.method": p.method,
                "trajectory_transfer.reading": "source trajectory -> new init, t selected on "
                + ("a held-out part of the source training data" if p.selection_fraction else "source val")
                + "; then target"}
