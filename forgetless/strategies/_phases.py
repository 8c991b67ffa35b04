"""Phases several strategies share: a linear probe (frozen backbone, BatchNorm in eval mode, the task's head trains)
and full fine-tuning (backbone and head, each at its own learning rate). Extra keyword arguments go to `Phase`."""
from __future__ import annotations

from typing import Any

from torch import nn

from forgetless.backbones.transfer_model import TransferModel
from forgetless.strategies.base import ParamGroup, Phase, TaskInfo, backbone_params, head_params


def probe_phase(model: TransferModel, task: TaskInfo, epochs: int, lr: float, name: str = "probe",
                eval_modules: list[nn.Module] | None = None, **options: Any) -> Phase:
    """Only the task's head trains; `eval_modules` default to the backbone (its BatchNorm statistics stay)."""
    return Phase(name=name, epochs=epochs, param_groups=[ParamGroup("head", head_params(model, task), lr)],
                 eval_modules=[model.backbone] if eval_modules is None else eval_modules, **options)


def finetune_phase(model: TransferModel, task: TaskInfo, epochs: int, backbone_lr: float, head_lr: float,
                   name: str = "finetune", **options: Any) -> Phase:
    """The backbone and the task's head train together."""
    return Phase(name=name, epochs=epochs, param_groups=[ParamGroup("backbone", backbone_params(model), backbone_lr),
                                                         ParamGroup("head", head_params(model, task), head_lr)],
                 **options)
