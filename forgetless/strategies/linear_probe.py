"""linear_probe: frozen backbone (BatchNorm in eval mode), only the task's head trains."""
from __future__ import annotations

from forgetless.strategies import register
from forgetless.strategies.base import ParamGroup, Phase, Strategy, StrategyParams, TaskInfo, head_params


@register
class LinearProbe(Strategy):
    name = "linear_probe"
    paper = "standard baseline (linear probing)"
    fidelity = "confirmed"
    Config = StrategyParams

    def phases(self, model, task: TaskInfo) -> list[Phase]:
        return [
            Phase(
                name="probe",
                epochs=self.epochs,
                param_groups=[ParamGroup("head", head_params(model, task), self.lr)],
                eval_modules=[model.backbone],
            )
        ]
