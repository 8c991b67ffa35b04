"""timm and torchvision image models as feature backbones: `timm:<architecture>`, `timm:<folder or s3://>`,
`torchvision:<architecture>`.

Weights never come from a hub: `params.weights` names a state dict file (`.safetensors`, `.pt`, `.pth`; a local path
or s3://), or, for timm, the spec is a folder in timm's own layout (config.json with `architecture`, and
model.safetensors or pytorch_model.bin) on disk or S3. Without weights the model starts from random initialisation and
the platform pre-trains it on the source task like a built-in backbone.

Inputs are images in [0, 1] of shape (B, C, H, W); the model's preprocessing runs inside the backbone: grey -> RGB,
resize to the model's input size, normalisation with the model's mean/std.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from forgetless.backbones.registry import register_backbone_prefix
from forgetless.storage import check_model_folder, local_folder, read_bytes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _import(name: str):
    try:
        return __import__(name)
    except Exception as e:  # torchvision built for another torch raises RuntimeError, not ImportError
        raise ValueError(
            f"{name} backbones need the `{name}` package importable beside this torch ({torch.__version__}); "
            f"importing it failed with: {type(e).__name__}: {e}. Install a {name} build that matches torch "
            f"(pip install 'forgetless[large]')"
        ) from None


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """A state dict from a path or s3:// URI: safetensors, or a torch file loaded with weights_only=True."""
    raw = read_bytes(uri)
    if uri.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors  # deferred: optional (comes with transformers / timm)

        return load_safetensors(raw)
    state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # common training-script layout
    return state


class ImageBackbone(nn.Module):
    """Wraps a classifier-less image model: preprocessing in, pooled features out."""

    def __init__(self, model: nn.Module, feature_dim: int, input_shape: tuple[int, ...], size: tuple[int, int],
                 mean, std, name: str, pretrained: bool):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"{name}: an image model needs inputs (C, H, W); got {input_shape}")
        self.model = model
        self.feature_dim = int(feature_dim)
        self.pretrained = pretrained
        self.num_channels = len(mean)
        if input_shape[0] not in (1, self.num_channels):
            raise ValueError(f"{name}: inputs have {input_shape[0]} channels, the model takes {self.num_channels}")
        self.image_size = tuple(int(s) for s in size)
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.num_channels != 1:
            x = x.expand(-1, self.num_channels, -1, -1)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x.float(), size=self.image_size, mode="bilinear", align_corners=False)
        x = (x - self.pixel_mean) / self.pixel_std
        return self.model(x.to(next(self.model.parameters()).dtype))


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], name: str, drop_prefixes: tuple[str, ...]) -> None:
    state = {k: v for k, v in state.items() if not k.startswith(drop_prefixes)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{name}: weights do not match the architecture: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


# ---------------------------------------------------------------------------------------------------------------------
# timm


def _timm_folder(spec: str) -> tuple[str, dict[str, Any], str | None]:
    """(architecture, model kwargs, weights file) of a timm folder (timm's hub layout: config.json + weights)."""
    folder = local_folder(spec)
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"timm:{spec}: no config.json in the folder")
    cfg = json.loads(cfg_file.read_text())
    arch = cfg.get("architecture") or cfg.get("model_name")
    if not arch:
        raise ValueError(f"timm:{spec}: config.json names no `architecture`")
    weights = next((str(folder / f) for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).exists()), None)
    return arch, dict(cfg.get("model_args", {})), weights


def _is_location(spec: str) -> bool:
    return spec.startswith(("s3://", "/", "./", "../", "~"))


def build_timm(spec: str, input_shape: tuple[int, ...], weights: str | None = None,
               model_args: dict[str, Any] | None = None, gradient_checkpointing: bool = False) -> ImageBackbone:
    timm = _import("timm")
    kwargs = dict(model_args or {})
    if _is_location(spec):
        arch, folder_args, folder_weights = _timm_folder(spec)
        kwargs = {**folder_args, **kwargs}
        weights = weights or folder_weights
    else:
        arch = spec
        if arch not in timm.list_models():
            raise ValueError(f"timm:{arch}: unknown architecture (see timm.list_models())")
    # pretrained=False always: timm would otherwise download from the hub.
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    if weights:
        head = model.default_cfg.get("classifier", "head")
        heads = tuple(head) if isinstance(head, (list, tuple)) else (head,)
        _load_weights(model, read_state_dict(weights), f"timm:{spec}", tuple(h + "." for h in heads))
    if gradient_checkpointing:
        model.set_grad_checkpointing(True)
    dc = timm.data.resolve_model_data_config(model)
    return ImageBackbone(model, model.num_features, input_shape, dc["input_size"][1:], dc["mean"], dc["std"],
                         f"timm:{spec}", pretrained=bool(weights))


def check_timm(spec: str, params: dict[str, Any]) -> None:
    unknown = set(params) - {"weights", "model_args", "gradient_checkpointing"}
    if unknown:
        raise ValueError(f"timm backbone params: unknown {sorted(unknown)}; known: weights, model_args, "
                         f"gradient_checkpointing")
    if _is_location(spec) and not spec.startswith("s3://"):
        check_model_folder(spec, prefix="timm:")
    _check_weights(params.get("weights"))


def _check_weights(weights: str | None) -> None:
    if weights and not weights.startswith("s3://") and not Path(weights).expanduser().exists():
        raise ValueError(f"backbone params.weights: file {weights!r} does not exist")


# ---------------------------------------------------------------------------------------------------------------------
# torchvision

_TV_HEADS = ("fc", "classifier", "heads", "head")


def build_torchvision(spec: str, input_shape: tuple[int, ...], weights: str | None = None,
                      image_size: int = 224) -> ImageBackbone:
    _import("torchvision")
    import torchvision.models as tvm  # deferred: optional; `_import` above turned a failed import into the fix

    try:
        model = tvm.get_model(spec, weights=None)
    except ValueError:
        raise ValueError(f"torchvision:{spec}: unknown architecture (see torchvision.models.list_models())") from None
    if weights:
        _load_weights(model, read_state_dict(weights), f"torchvision:{spec}", ())
    # The classifier becomes an identity: its input is the feature vector.
    for attr in _TV_HEADS:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if not isinstance(head, nn.Linear) \
                else [head]
            if linears:
                setattr(model, attr, nn.Identity())
                return ImageBackbone(model, linears[0].in_features, input_shape, (image_size, image_size),
                                     IMAGENET_MEAN, IMAGENET_STD, f"torchvision:{spec}", pretrained=bool(weights))
    raise ValueError(f"torchvision:{spec}: cannot find its classifier (one of {_TV_HEADS}) to turn into features")


def check_torchvision(spec: str, params: dict[str, Any]) -> None:
    unknown = set(params) - {"weights", "image_size"}
    if unknown:
        raise ValueError(f"torchvision backbone params: unknown {sorted(unknown)}; known: weights, image_size")
    _check_weights(params.get("weights"))


register_backbone_prefix("timm:", build_timm, check_timm)
register_backbone_prefix("torchvision:", build_torchvision, check_torchvision)
