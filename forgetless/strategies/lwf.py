"""lwf — Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017).

On task k, the old model's softened outputs (temperature T = 2) for every earlier head — the source head included — on
the *new* task's inputs are the targets of a distillation term: loss = CE + λ_o · Σ_{j<k} CE(softmax(ŷ_j^old / T),
softmax(ŷ_j / T)). The old model is a frozen copy of the backbone and heads kept in the model
(`model.extras["lwf_old"]`, structure in `build()`, weights copied in `after_source` / `after_task`), so checkpoints
capture it. Optional warm-up (the paper's): train only the new head first, with the backbone frozen.

Deviation, documented: the paper also fine-tunes the old heads θ_o through the distillation term; here old heads stay
frozen (the project keeps the source head frozen so that source accuracy stays measurable), so only the shared backbone
is pulled towards the old outputs.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from forgetless.backbones.transfer_model import head_key
from forgetless.data.kinds import CAUSAL_LM, CLASSIFICATION
from forgetless.strategies import register
from forgetless.strategies._phases import finetune_phase, probe_phase
from forgetless.strategies.base import Phase, Strategy, StrategyParams, TaskInfo

OLD = "lwf_old"


class LwFParams(StrategyParams):
    temperature: float = Field(2.0, gt=0.0, le=20.0, description="distillation temperature T (paper: 2)")
    distill_weight: float = Field(1.0, ge=0.0, le=100.0, description="λ_o, weight of the old-task term (paper: 1)")
    warmup_epochs: int = Field(0, ge=0, description="epochs of new-head-only warm-up before joint training (0 = none)")
    backbone_lr_scale: float = Field(1.0, gt=0.0, le=10.0, description="backbone lr = scale x lr (typical 0.01-1)")


def distillation_loss(new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy between the old model's softened distribution and the new one's, over the last axis (classes, or a
    language model's vocabulary at every position: distillation on token logits), mean over everything else."""
    target = F.softmax(old_logits.float() / temperature, dim=-1)
    return -(target * F.log_softmax(new_logits.float() / temperature, dim=-1)).sum(-1).mean()


@register
class LwF(Strategy):
    name = "lwf"
    paper = "Li & Hoiem, Learning without Forgetting (ECCV 2016, TPAMI 2017)"
    fidelity = "confirmed"
    task_kinds = (CLASSIFICATION, CAUSAL_LM)  # on a language model its head is a per-task vocabulary bias
    Config = LwFParams
    has_per_task_parts = True  # per-task heads
    max_zero_stage = 2  # the frozen copy and the old heads run outside the engine's forward

    def build(self, model, tasks: list[TaskInfo]) -> None:
        old = nn.ModuleDict({"backbone": copy.deepcopy(model.backbone), "heads": copy.deepcopy(model.heads)})
        for p in old.parameters():
            p.requires_grad_(False)
        model.extras[OLD] = old

    def phases(self, model, task: TaskInfo) -> list[Phase]:
        p = self.params
        frozen_copy = model.extras[OLD]
        out = []
        if p.warmup_epochs:
            out.append(probe_phase(model, task, p.warmup_epochs, self.lr, name="warmup",
                                   eval_modules=[model.backbone, frozen_copy]))
        out.append(finetune_phase(model, task, self.epochs, self.lr * p.backbone_lr_scale, self.lr, name="lwf",
                                  eval_modules=[frozen_copy]))
        return out

    def old_targets(self, model, x: torch.Tensor, old_tasks: list[int]) -> list[torch.Tensor]:
        """The frozen old model's logits of every earlier head on the new inputs (no gradient)."""
        old = model.extras[OLD]
        with torch.no_grad():
            feats = old["backbone"](x)
            return [old["heads"][head_key(j)](feats) for j in old_tasks]

    def extra_loss(self, model, x, y, task: TaskInfo, logits):
        p = self.params
        if p.distill_weight == 0 or task.index == 0 or not any(w.requires_grad for w in model.backbone.parameters()):
            return None  # nothing to distil into (a warm-up phase trains only the new head)
        old_tasks = list(range(task.index))
        targets = self.old_targets(model, x, old_tasks)
        # The current model's old-head outputs; the frozen backbone copy of a warm-up phase gets no gradient anyway.
        feats = model.features(x, 0)
        loss = sum(distillation_loss(model.heads[head_key(j)](model.head_features(feats, j)), t, p.temperature)
                   for j, t in zip(old_tasks, targets))
        return p.distill_weight * loss

    def _snapshot(self, model) -> None:
        old = model.extras[OLD]
        with torch.no_grad():
            old["backbone"].load_state_dict(model.backbone.state_dict())
            old["heads"].load_state_dict(model.heads.state_dict())

    def after_source(self, model, source, batches, all_reduce_mean) -> None:
        self._snapshot(model)

    def after_task(self, model, task, batches, all_reduce_mean) -> None:
        self._snapshot(model)
