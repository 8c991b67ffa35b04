"""lp_ft (Kumar et al., ICLR 2022): linear probe to convergence, then full fine-tuning from that head."""
from __future__ import annotations

from pydantic import Field

from forgetless.data.kinds import CAUSAL_LM, CLASSIFICATION
from forgetless.strategies import register
from forgetless.strategies._phases import finetune_phase, probe_phase
from forgetless.strategies.base import Phase, Strategy, StrategyParams, TaskInfo


class LpFtParams(StrategyParams):
    probe_epochs: int | None = Field(None, gt=0, description="epochs of the probe phase (default: train.epochs)")
    probe_lr_scale: float = Field(10.0, gt=0.0, le=100.0, description="probe lr = scale x lr (heads tolerate more)")
    finetune_lr_scale: float = Field(1.0, gt=0.0, le=10.0, description="fine-tuning lr = scale x lr")


@register
class LpFt(Strategy):
    name = "lp_ft"
    paper = "Kumar et al., Fine-Tuning can Distort Pretrained Features (ICLR 2022)"
    fidelity = "confirmed"
    task_kinds = (CLASSIFICATION, CAUSAL_LM)  # on a language model its head is a per-task vocabulary bias
    Config = LpFtParams
    works_on_partitions = True  # phases only: nothing reads weights outside the engine

    def phases(self, model, task: TaskInfo) -> list[Phase]:
        p = self.params
        return [probe_phase(model, task, p.probe_epochs or self.epochs, self.lr * p.probe_lr_scale),
                finetune_phase(model, task, self.epochs, self.lr * p.finetune_lr_scale, self.lr * p.finetune_lr_scale)]
