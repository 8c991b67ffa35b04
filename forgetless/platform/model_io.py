"""Building a run's model and loading weights into it: the same on every rank, and on the driver for exports."""
from __future__ import annotations

import io
from typing import Any

import torch

from forgetless.backbones import TransferModel, build_backbone
from forgetless.config import ExperimentConfig
from forgetless.storage import read_bytes
from forgetless.strategies.base import Strategy, TaskInfo


def build_model(cfg: ExperimentConfig, tasks: list[TaskInfo], strategy: Strategy) -> TransferModel:
    """Backbone (seeded θ⁰) + one head per task + the strategy's surgery; identical on every rank."""
    init_seed = cfg.pretrain.init_seed if cfg.pretrain.init_seed is not None else cfg.seed
    torch.manual_seed(init_seed)
    backbone = build_backbone(cfg.backbone.name, tuple(tasks[0].input_shape), cfg.backbone.params)
    model = TransferModel(backbone, [t.num_classes for t in tasks], seed=cfg.seed)
    strategy.build(model, tasks)
    return model


def load_torch_file(uri: str) -> Any:
    # weights_only: a file a user can supply is never unpickled as code.
    return torch.load(io.BytesIO(read_bytes(uri)), map_location="cpu", weights_only=True)


def load_pretrained(model: TransferModel, state: dict[str, torch.Tensor]) -> None:
    """Load a pre-trained backbone (and source head) into a freshly built model; nothing else is touched.

    `state` is a TransferModel state dict (a pre-training checkpoint) or a plain backbone state dict (user weights).
    """
    wanted = {k: v for k, v in state.items() if k.startswith("backbone.") or k.startswith("heads.t0.")}
    if not any(k.startswith("backbone.") for k in wanted):
        wanted = {f"backbone.{k}": v for k, v in state.items()}  # a plain backbone state dict
    missing, unexpected = model.load_state_dict(wanted, strict=False)
    # Backbone entries a strategy's surgery added (EXPANSE's new units) cannot be in the pretrained weights.
    added = set(getattr(model, "surgery_added_keys", ()))
    missing_backbone = [k for k in missing if k.startswith("backbone.") and k not in added]
    if missing_backbone or unexpected:
        raise ValueError(
            f"pretrained weights do not match the backbone: missing {missing_backbone[:5]}, unexpected {unexpected[:5]}"
        )
