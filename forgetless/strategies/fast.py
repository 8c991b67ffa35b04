"""fast — Fast And Stable Task-adaptation (Varno et al., arXiv 2007.01388). *Interpretation*: the paper's update rule
was not available; this follows its stated idea (the randomly initialised head's large, uninformative gradients damage
the backbone before anything about the target is learnt), see docs/strategies.md.

1. align: backbone frozen (BatchNorm in eval mode), only the new head trains, at a high learning rate η_h. The phase
   ends as soon as the head is aligned: the target validation loss, evaluated every `align_eval_every_steps` steps,
   improved by less than `plateau_tolerance` (relative) over the last `plateau_window` evaluations — or after
   `align_max_steps`.
2. adapt: everything trains; η_g = ρ·η_h with a linear warm-up of η_g over `warmup_steps`, and optionally the L2 norm
   of each step's backbone update capped at `backbone_update_cap`.
"""
from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field

from forgetless.strategies import register
from forgetless.strategies._phases import finetune_phase, probe_phase
from forgetless.strategies.base import Phase, Strategy, StrategyParams, TaskInfo


class FastParams(StrategyParams):
    head_lr_scale: float = Field(10.0, gt=0.0, le=1000.0, description="η_h = scale x train.lr, both phases (typ. 3-30)")
    align_max_steps: int = Field(100, gt=0, description="K_max: longest align phase in optimizer steps (typ. 20-500)")
    align_eval_every_steps: int = Field(5, gt=0,
                                        description="validation-loss check period in the align phase (typ. 2-20)")
    plateau_window: int = Field(3, ge=1, le=100,
                                description="w: evaluations the improvement is measured over (typ. 2-5)")
    plateau_tolerance: float = Field(
        0.02, ge=0.0, lt=1.0,
        description="ε: switch when the loss improved by less than this fraction (typ. 0.005-0.1)")
    rho: float = Field(0.1, gt=0.0, le=1.0, description="ρ: backbone lr = ρ x head lr in the adapt phase (typ. 0.01-1)")
    warmup_steps: int = Field(20, ge=0, description="W: steps of linear warm-up of the backbone lr (typ. 0-500)")
    backbone_update_cap: float | None = Field(
        None, gt=0.0, description="max L2 norm of one step's backbone update (None = no cap; typ. 1e-3-1e-1)")
    adapt_epochs: int | None = Field(None, gt=0, description="epochs of the adapt phase (default: train.epochs)")


def plateau_rule(window: int, tolerance: float) -> Callable[[list[float]], bool]:
    """True once the newest `window` losses improved on the loss `window` evaluations ago by less than `tolerance`
    (relative). Needs `window + 1` evaluations, so the phase always gets at least `window` checks."""

    def stop(losses: list[float]) -> bool:
        if len(losses) <= window:
            return False
        ref = losses[-window - 1]
        best = min(losses[-window:])
        return (ref - best) < tolerance * max(abs(ref), 1e-12)

    return stop


def warmup_multipliers(warmup_steps: int) -> Callable[[int], list[float]]:
    """Per-group multipliers for (backbone, head): the backbone ramps linearly to 1 over `warmup_steps`."""

    def mult(step: int) -> list[float]:
        ramp = 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)
        return [ramp, 1.0]

    return mult


class UpdateNormCap:
    """Phase hooks that cap the L2 norm of one optimizer step's change of the backbone: before the step the backbone
    is remembered, after it the change is scaled down to `cap` if it is longer."""

    def __init__(self, cap: float):
        self.cap = cap
        self._before: list[torch.Tensor] = []
        self.clipped_steps = 0

    def before_step(self, model) -> None:
        self._before = [p.detach().clone() for p in model.backbone.parameters()]

    @torch.no_grad()
    def after_step(self, model) -> None:
        params = list(model.backbone.parameters())
        deltas = [p - b for p, b in zip(params, self._before)]
        norm = torch.sqrt(sum((d.float() ** 2).sum() for d in deltas))
        if norm > self.cap:
            scale = self.cap / float(norm)
            for p, b, d in zip(params, self._before, deltas):
                p.copy_(b + d * scale)
            self.clipped_steps += 1
        self._before = []


@register
class Fast(Strategy):
    name = "fast"
    paper = "Varno et al., Fast And Stable Task-adaptation (arXiv 2007.01388)"
    fidelity = "interpretation"
    Config = FastParams
    has_per_task_parts = True  # per-task heads (the shared backbone still drifts in the adapt phase)
    # The optional update cap rewrites backbone weights after the step; the platform runs step hooks on gathered
    # weights and pushes the rewrite into DeepSpeed's master copy, so every ZeRO stage works.
    max_zero_stage = 3

    def phases(self, model, task: TaskInfo) -> list[Phase]:
        p = self.params
        head_lr = self.lr * p.head_lr_scale
        align = probe_phase(
            model, task, self.epochs, head_lr, name="align",
            max_steps=p.align_max_steps,
            eval_every_steps=p.align_eval_every_steps,
            stop_rule=plateau_rule(p.plateau_window, p.plateau_tolerance),
        )
        cap = UpdateNormCap(p.backbone_update_cap) if p.backbone_update_cap else None
        adapt = finetune_phase(
            model, task, p.adapt_epochs or self.epochs, p.rho * head_lr, head_lr, name="adapt",
            lr_multipliers=warmup_multipliers(p.warmup_steps),
            before_step=cap.before_step if cap else None,
            after_step=cap.after_step if cap else None,
        )
        return [align, adapt]
