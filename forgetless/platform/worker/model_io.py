"""Building a run's model and loading weights into it: the same on every rank, and on the driver for exports."""
from __future__ import annotations

import io
import tempfile
import zipfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from forgetless.backbones import TransferModel, build_backbone
from forgetless.config import ExperimentConfig
from forgetless.storage import is_s3, read_bytes
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


@contextmanager
def mapped_torch_file(uri: str) -> Iterator[Any]:
    """A torch file's contents memory-mapped (weights only): tensors are read from disk as they are used, so loading
    a large state dict into ZeRO-3 partitions never holds the whole file in memory. An s3:// file is downloaded to a
    temporary file first."""
    if not is_s3(uri):
        # torch's legacy (non-zip) format cannot be mapped: read whole
        yield torch.load(uri, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(uri))
        return
    with tempfile.NamedTemporaryFile(suffix=".pt") as f:
        f.write(read_bytes(uri))
        f.flush()
        yield torch.load(f.name, map_location="cpu", weights_only=True, mmap=True)


LoadStateDict = Callable[[dict[str, torch.Tensor]], tuple[list[str], list[str]]]


def load_pretrained(model: TransferModel, state: dict[str, torch.Tensor], load: LoadStateDict | None = None) -> None:
    """Load a pre-trained backbone (and source head) into a freshly built model; nothing else is touched.

    `state` is a TransferModel state dict (a pre-training checkpoint) or a plain backbone state dict (user weights).
    `load(wanted) -> (missing, unexpected)` puts the weights in (default: `model.load_state_dict(..., strict=False)`;
    a ZeRO-3 partitioned model passes one that copies each rank's slices).
    """
    wanted = {k: v for k, v in state.items() if k.startswith("backbone.") or k.startswith("heads.t0.")}
    if not any(k.startswith("backbone.") for k in wanted):
        wanted = {f"backbone.{k}": v for k, v in state.items()}  # a plain backbone state dict
    missing, unexpected = (load or (lambda sd: model.load_state_dict(sd, strict=False)))(wanted)
    # Backbone entries a strategy's surgery added (EXPANSE's new units) cannot be in the pretrained weights.
    added = set(getattr(model, "surgery_added_keys", ()))
    missing_backbone = [k for k in missing if k.startswith("backbone.") and k not in added]
    if missing_backbone or unexpected:
        raise ValueError(
            f"pretrained weights do not match the backbone: missing {missing_backbone[:5]}, unexpected {unexpected[:5]}"
        )
