"""Built-in small backbones: real architectures at laptop scale (MLP, 2-D CNN, 1-D CNN), BatchNorm where sensible.

Every backbone maps inputs to a flat feature vector and exposes `feature_dim`; heads live outside the backbone.
"""
from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import nn


class BackboneParams(BaseModel):
    """A built-in backbone's constructor arguments as typed fields: `backbone.params` is checked against it when the
    config loads (an unknown key or a wrong type names the field), not when a worker builds the model."""

    # strict: a YAML string "64" for a width is a typo to report, not a value to coerce.
    model_config = ConfigDict(extra="forbid", strict=True)


class MLPParams(BackboneParams):
    hidden: list[PositiveInt] = Field(default_factory=lambda: [128, 64], min_length=1, description="layer widths")
    batchnorm: bool = False
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class ConvParams(BackboneParams):
    channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64], min_length=1, description="block widths")
    pool: list[bool] | None = Field(None, description="2x pooling after each block; default: all but the last")

    @model_validator(mode="after")
    def _one_pool_flag_per_block(self) -> "ConvParams":
        if self.pool is not None and len(self.pool) != len(self.channels):
            raise ValueError(f"pool has {len(self.pool)} entries but channels has {len(self.channels)}; "
                             f"give one flag per block")
        return self


class CNN1dParams(ConvParams):
    kernel_size: PositiveInt = 5


class MLP(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], hidden: list[int] | None = None, batchnorm: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        hidden = list(hidden or [128, 64])
        layers: list[nn.Module] = [nn.Flatten()]
        width = int(math.prod(input_shape))
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batchnorm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.feature_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _conv_body(c_in: int, channels: list[int] | None, pool: list[bool] | None, kernel_size: int, conv: type[nn.Module],
               bn: type[nn.Module], max_pool: type[nn.Module], global_pool: type[nn.Module]) -> tuple[nn.Sequential, int]:
    """conv-BN-ReLU blocks (optional 2x pooling after each), then global average pooling: (body, feature width)."""
    channels = list(channels or [32, 64])
    pool = list(pool or [True] * (len(channels) - 1) + [False])
    layers: list[nn.Module] = []
    for c, p in zip(channels, pool):
        layers += [conv(c_in, c, kernel_size, padding=kernel_size // 2), bn(c), nn.ReLU()]
        if p:
            layers.append(max_pool(2))
        c_in = c
    layers += [global_pool(1), nn.Flatten()]
    return nn.Sequential(*layers), c_in


class CNN2d(nn.Module):
    """conv-BN-ReLU blocks with optional 2x2 pooling, global average pooling to features."""

    def __init__(self, input_shape: tuple[int, ...], channels: list[int] | None = None, pool: list[bool] | None = None):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"cnn2d needs image inputs (C, H, W), got shape {input_shape}; use mlp or cnn1d")
        self.body, self.feature_dim = _conv_body(input_shape[0], channels, pool, 3, nn.Conv2d, nn.BatchNorm2d,
                                                 nn.MaxPool2d, nn.AdaptiveAvgPool2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class CNN1d(nn.Module):
    """The 1-D analogue, for sequences such as MNIST-1D."""

    def __init__(self, input_shape: tuple[int, ...], channels: list[int] | None = None, kernel_size: int = 5,
                 pool: list[bool] | None = None):
        super().__init__()
        if len(input_shape) != 2:
            raise ValueError(f"cnn1d needs sequence inputs (C, L), got shape {input_shape}")
        self.body, self.feature_dim = _conv_body(input_shape[0], channels, pool, kernel_size, nn.Conv1d, nn.BatchNorm1d,
                                                 nn.MaxPool1d, nn.AdaptiveAvgPool1d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
