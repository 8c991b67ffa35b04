"""source_pretrain: training on the source task (stage 0), the first run of every experiment.

It is a strategy like the others, run by the same loop: from scratch every backbone parameter and the source head
train; on a backbone that arrives pretrained (`backbone.weights`, or a backbone that loads its own weights such as a
Hugging Face folder) only the source head trains, the backbone frozen with BatchNorm in eval mode. It is not a transfer
strategy, so it cannot be listed under `strategies:`.
"""
from __future__ import annotations

from pydantic import Field

from forgetless.strategies import register
from forgetless.strategies.base import ParamGroup, Phase, Strategy, StrategyParams, TaskInfo, backbone_params, head_params


class SourcePretrainParams(StrategyParams):
    head_only: bool = Field(False, description="train only the source head (the backbone's weights are given)")


@register
class SourcePretrain(Strategy):
    name = "source_pretrain"
    paper = "standard (supervised pre-training on the source task)"
    fidelity = "confirmed"
    Config = SourcePretrainParams
    works_on_partitions = True  # phases only: nothing reads weights outside the engine
    transfer = False

    def phases(self, model, task: TaskInfo) -> list[Phase]:
        if self.params.head_only or getattr(model.backbone, "pretrained", False):
            return [Phase("source_head", self.epochs, [ParamGroup("head", head_params(model, task), self.lr)],
                          eval_modules=[model.backbone])]
        return [Phase("pretrain", self.epochs,
                      [ParamGroup("all", backbone_params(model) + head_params(model, task), self.lr)])]

    def tags(self) -> dict[str, str]:
        # The pre-training run is not a transfer run: it carries no strategy tags, so filtering runs by strategy
        # finds only transfers.
        return {}
