"""linear_probe: frozen backbone (BatchNorm in eval mode), only the task's head trains."""
from __future__ import annotations

from forgetless.data.kinds import CAUSAL_LM, CLASSIFICATION
from forgetless.strategies import register
from forgetless.strategies._phases import probe_phase
from forgetless.strategies.base import Phase, Strategy, StrategyParams, TaskInfo


@register
class LinearProbe(Strategy):
    name = "linear_probe"
    paper = "standard baseline (linear probing)"
    fidelity = "confirmed"
    task_kinds = (CLASSIFICATION, CAUSAL_LM)  # on a language model its head is a per-task vocabulary bias
    Config = StrategyParams
    works_on_partitions = True  # phases only: nothing reads weights outside the engine

    def phases(self, model, task: TaskInfo) -> list[Phase]:
        return [probe_phase(model, task, self.epochs, self.lr)]
