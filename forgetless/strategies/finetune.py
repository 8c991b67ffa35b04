"""finetune: new head, every parameter trains; optionally a smaller learning rate for the backbone, and backbone
parameters kept frozen by name (a control run: e.g. full fine-tuning with a language model's embeddings frozen)."""
from __future__ import annotations

from fnmatch import fnmatchcase

from pydantic import Field

from forgetless.data.kinds import CAUSAL_LM, CLASSIFICATION
from forgetless.strategies import register
from forgetless.strategies._phases import finetune_phase
from forgetless.strategies.base import Phase, Strategy, StrategyParams, TaskInfo


class FinetuneParams(StrategyParams):
    backbone_lr_scale: float = Field(1.0, gt=0.0, le=10.0, description="backbone lr = scale x lr (typical 0.01-1)")
    frozen: list[str] = Field(default_factory=list, description=(
        "backbone parameter names (glob patterns, e.g. '*wte*' for a GPT-2's token embeddings) that do not train; "
        "default: none"))


@register
class Finetune(Strategy):
    name = "finetune"
    paper = "standard baseline (full fine-tuning)"
    fidelity = "confirmed"
    task_kinds = (CLASSIFICATION, CAUSAL_LM)  # on a language model its head is a per-task vocabulary bias
    Config = FinetuneParams
    works_on_partitions = True  # phases only: nothing reads weights outside the engine
    has_per_task_parts = True  # per-task heads (the shared backbone still drifts)

    def phases(self, model, task: TaskInfo) -> list[Phase]:
        phase = finetune_phase(model, task, self.epochs, self.lr * self.params.backbone_lr_scale, self.lr)
        if self.params.frozen:
            frozen = {id(p) for n, p in model.backbone.named_parameters()
                      if any(fnmatchcase(n, pattern) for pattern in self.params.frozen)}
            if not frozen:
                names = [n for n, _ in model.backbone.named_parameters()][:8]
                raise ValueError(f"frozen: no backbone parameter matches {self.params.frozen}; names look like {names}")
            backbone = phase.param_groups[0]
            backbone.params = [p for p in backbone.params if id(p) not in frozen]
        return [phase]
