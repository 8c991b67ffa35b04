"""Backbones: the built-in small nets, a small ResNet, Hugging Face / timm / torchvision models (by name prefix), and
the `TransferModel` (backbone + per-task heads) every strategy works on. See `registry` for how names are resolved."""
from __future__ import annotations

from forgetless.backbones.builtin import CNN1d, CNN2d, MLP
from forgetless.backbones.registry import (BackboneBuilder, available_backbones, build_backbone, check_backbone,
                                           is_builtin_backbone, is_known_backbone, register_backbone,
                                           register_backbone_prefix)
from forgetless.backbones.transfer_model import TransferModel

# Importing these registers the built-in "resnet" and the hf:, timm: and torchvision: prefixes (the order of the
# prefixes is the order of these imports).
from forgetless.backbones import resnet as _resnet  # noqa: F401  isort: skip
from forgetless.backbones import hf as _hf  # noqa: F401  isort: skip
from forgetless.backbones import vision as _vision  # noqa: F401  isort: skip

__all__ = ["TransferModel", "build_backbone", "register_backbone", "register_backbone_prefix", "available_backbones",
           "is_known_backbone", "is_builtin_backbone", "check_backbone", "BackboneBuilder", "MLP", "CNN2d", "CNN1d"]
