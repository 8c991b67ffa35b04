"""finetune: new head, every parameter trains; optionally a smaller learning rate for the backbone."""
from __future__ import annotations

from pydantic import Field

from forgetless.data.kinds import CAUSAL_LM, CLASSIFICATION
from forgetless.strategies import register
from forgetless.strategies._phases import finetune_phase
from forgetless.strategies.base import Phase, Strategy, StrategyParams, TaskInfo


class FinetuneParams(StrategyParams):
    backbone_lr_scale: float = Field(1.0, gt=0.0, le=10.0, description="backbone lr = scale x lr (typical 0.01-1)")


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
        return [finetune_phase(model, task, self.epochs, self.lr * self.params.backbone_lr_scale, self.lr)]
