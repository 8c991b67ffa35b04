"""Backbone registry: a name maps to a builder `(input_shape, **params) -> nn.Module with .feature_dim`.

Modules that load other model families (Hugging Face, timm, torchvision) register prefixes such as `hf:` through
`register_backbone_prefix`; the built-in ResNet registers itself with `register_backbone`.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from forgetless.backbones.builtin import CNN1d, CNN2d, MLP

BackboneBuilder = Callable[..., nn.Module]

_BACKBONES: dict[str, BackboneBuilder] = {"mlp": MLP, "cnn2d": CNN2d, "cnn1d": CNN1d}
_PREFIXES: dict[str, BackboneBuilder] = {}
_PREFIX_CHECKS: dict[str, Callable[[str, dict[str, Any]], None]] = {}


def register_backbone(name: str, builder: BackboneBuilder) -> None:
    _BACKBONES[name] = builder


def register_backbone_prefix(prefix: str, builder: BackboneBuilder,
                             check: Callable[[str, dict[str, Any]], None] | None = None) -> None:
    """`builder(spec_after_prefix, input_shape, **params)` for names like `hf:/models/bert`; `check(spec, params)`
    (optional) validates them at config time without building anything, raising ValueError with the fix."""
    _PREFIXES[prefix] = builder
    if check is not None:
        _PREFIX_CHECKS[prefix] = check


def check_backbone(name: str, params: dict[str, Any]) -> None:
    """Config-time validation of a prefixed backbone (a model folder that must exist, known params...)."""
    for prefix, check in _PREFIX_CHECKS.items():
        if name.startswith(prefix):
            check(name[len(prefix):], dict(params))


def available_backbones() -> list[str]:
    return sorted(_BACKBONES) + [f"{p}<path>" for p in sorted(_PREFIXES)]


def is_known_backbone(name: str) -> bool:
    return name in _BACKBONES or any(name.startswith(p) for p in _PREFIXES)


def build_backbone(name: str, input_shape: tuple[int, ...], params: dict[str, Any] | None = None) -> nn.Module:
    params = dict(params or {})
    if name in _BACKBONES:
        try:
            model = _BACKBONES[name](tuple(input_shape), **params)
        except TypeError as e:
            raise ValueError(f"backbone {name!r}: bad params {params}: {e}") from None
    else:
        for prefix, builder in _PREFIXES.items():
            if name.startswith(prefix):
                model = builder(name[len(prefix):], tuple(input_shape), **params)
                break
        else:
            raise ValueError(f"unknown backbone {name!r}; available: {available_backbones()}")
    if not hasattr(model, "feature_dim"):
        raise ValueError(f"backbone {name!r} does not expose feature_dim")
    return model
