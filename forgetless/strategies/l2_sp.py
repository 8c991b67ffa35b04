"""l2_sp (Li, Grandvalet & Davoine, ICML 2018): fine-tune everything, pulled back to the starting point.

loss = CE + α/2·‖θ_g − θ_g⁰‖² + β/2·‖θ_h‖², with θ_g⁰ the pre-trained backbone (kept as buffers in the model, filled in
`after_source`) and θ_h the current task's head. On a stream the anchor stays the pre-trained backbone by default (the
"starting point"); `anchor: previous_task` re-anchors after every task instead.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from forgetless.data.kinds import CAUSAL_LM, CLASSIFICATION
from forgetless.strategies import register
from forgetless.strategies._penalties import ParamStore, named, quadratic_penalty
from forgetless.strategies._phases import finetune_phase
from forgetless.strategies.base import Phase, Strategy, StrategyParams, TaskInfo, head_params

STORE = "l2_sp"


class L2SPParams(StrategyParams):
    alpha: float = Field(0.1, ge=0.0, le=1e4, description="α, pull of the backbone to its anchor (paper: 0.001-1)")
    beta: float = Field(0.01, ge=0.0, le=1e4, description="β, L2 decay of the new head (paper: 0.01)")
    anchor: Literal["pretrained", "previous_task"] = Field(
        "pretrained", description="pretrained: θ_g⁰ stays the pre-trained backbone; previous_task: re-anchor per task")
    backbone_lr_scale: float = Field(1.0, gt=0.0, le=10.0, description="backbone lr = scale x lr (typical 0.01-1)")


@register
class L2SP(Strategy):
    name = "l2_sp"
    paper = "Li, Grandvalet & Davoine, Explicit Inductive Bias for Transfer Learning with CNNs (ICML 2018)"
    fidelity = "confirmed"
    task_kinds = (CLASSIFICATION, CAUSAL_LM)  # on a language model its head is a per-task vocabulary bias
    Config = L2SPParams
    has_per_task_parts = True  # per-task heads (the shared backbone still drifts, only more slowly)
    max_zero_stage = 2  # the penalty reads backbone weights outside a module's forward

    def build(self, model, tasks: list[TaskInfo]) -> None:
        model.extras[STORE] = ParamStore(named(model.backbone), kinds=["anchor"])

    def phases(self, model, task: TaskInfo) -> list[Phase]:
        return [finetune_phase(model, task, self.epochs, self.lr * self.params.backbone_lr_scale, self.lr)]

    def extra_loss(self, model, x, y, task: TaskInfo, logits):
        p = self.params
        store = model.extras[STORE]
        loss = 0.5 * p.beta * sum((w.float() ** 2).sum() for w in head_params(model, task))
        if float(store.filled) > 0 and p.alpha > 0:
            loss = loss + 0.5 * p.alpha * quadratic_penalty(named(model.backbone), store, None)
        return loss

    def after_source(self, model, source, batches, all_reduce_mean) -> None:
        model.extras[STORE].set("anchor", dict(named(model.backbone)))

    def after_task(self, model, task, batches, all_reduce_mean) -> None:
        if self.params.anchor == "previous_task":
            model.extras[STORE].set("anchor", dict(named(model.backbone)))
