"""Backbone registry: a name maps to a builder `(input_shape, **params) -> nn.Module with .feature_dim`.

Modules that load other model families (Hugging Face, timm, torchvision) register prefixes such as `hf:` through
`register_backbone_prefix`; the built-in ResNet registers itself with `register_backbone`.
"""
from __future__ import annotations

from typing import Any, Callable

from pydantic import ValidationError
from torch import nn

from forgetless.backbones.builtin import BackboneParams, CNN1d, CNN1dParams, CNN2d, ConvParams, MLP, MLPParams

BackboneBuilder = Callable[..., nn.Module]

_BACKBONES: dict[str, BackboneBuilder] = {"mlp": MLP, "cnn2d": CNN2d, "cnn1d": CNN1d}
_PARAMS: dict[str, type[BackboneParams]] = {"mlp": MLPParams, "cnn2d": ConvParams, "cnn1d": CNN1dParams}
_PREFIXES: dict[str, BackboneBuilder] = {}
_PREFIX_CHECKS: dict[str, Callable[[str, dict[str, Any]], None]] = {}


def register_backbone(name: str, builder: BackboneBuilder, params: type[BackboneParams] | None = None) -> None:
    """`params`: the builder's keyword arguments as a typed model, checked when a config loads."""
    _BACKBONES[name] = builder
    if params is not None:
        _PARAMS[name] = params


def register_backbone_prefix(prefix: str, builder: BackboneBuilder,
                             check: Callable[[str, dict[str, Any]], None] | None = None) -> None:
    """`builder(spec_after_prefix, input_shape, **params)` for names like `hf:/models/bert`; `check(spec, params)`
    (optional) validates them at config time without building anything, raising ValueError with the fix."""
    _PREFIXES[prefix] = builder
    if check is not None:
        _PREFIX_CHECKS[prefix] = check


def check_backbone(name: str, params: dict[str, Any]) -> None:
    """Config-time validation: a built-in backbone's params against its typed params model, a prefixed backbone by
    its own check (a model folder that must exist, known params...). Raises ValueError naming the param."""
    if name in _PARAMS:
        check_builtin_params(name, params)
        return
    for prefix, check in _PREFIX_CHECKS.items():
        if name.startswith(prefix):
            check(name[len(prefix):], dict(params))


def check_builtin_params(name: str, params: dict[str, Any]) -> None:
    model = _PARAMS[name]
    try:
        model.model_validate(params)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(["params", *(str(p) for p in err["loc"])])
        takes = ", ".join(f"{k}={v!r}" for k, v in model().model_dump().items())
        if err["type"] == "extra_forbidden":
            raise ValueError(f"{where}: backbone {name!r} has no such parameter; it takes {takes}") from None
        what = err["msg"].removeprefix("Value error, ")
        got = f" (got {err['input']!r})" if err["loc"] else ""
        raise ValueError(f"{where}: {what}{got}; backbone {name!r} takes {takes} (the defaults)") from None


def is_builtin_backbone(name: str) -> bool:
    """A backbone of this package (cheap to build on the driver), not a model family loaded by prefix."""
    return name in _BACKBONES


def available_backbones() -> list[str]:
    return sorted(_BACKBONES) + [f"{p}<path>" for p in sorted(_PREFIXES)]


def is_known_backbone(name: str) -> bool:
    return name in _BACKBONES or any(name.startswith(p) for p in _PREFIXES)


def build_backbone(name: str, input_shape: tuple[int, ...], params: dict[str, Any] | None = None) -> nn.Module:
    params = dict(params or {})
    if name in _BACKBONES:
        if name in _PARAMS:
            try:
                check_builtin_params(name, params)
            except ValueError as e:
                raise ValueError(f"backbone {name!r}: bad params: {e}") from None
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
