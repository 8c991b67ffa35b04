"""Built-in small backbones: real architectures at laptop scale (MLP, 2-D CNN, 1-D CNN), BatchNorm where sensible.

Every backbone maps inputs to a flat feature vector and exposes `feature_dim`; heads live outside the backbone.
"""
from __future__ import annotations

import math

import torch
from torch import nn


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


class CNN2d(nn.Module):
    """conv-BN-ReLU blocks with optional 2x2 pooling, global average pooling to features."""

    def __init__(self, input_shape: tuple[int, ...], channels: list[int] | None = None, pool: list[bool] | None = None):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"cnn2d needs image inputs (C, H, W), got shape {input_shape}; use mlp or cnn1d")
        channels = list(channels or [32, 64])
        pool = list(pool or [True] * (len(channels) - 1) + [False])
        layers: list[nn.Module] = []
        c_in = input_shape[0]
        for c, p in zip(channels, pool):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            if p:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.feature_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class CNN1d(nn.Module):
    """The 1-D analogue, for sequences such as MNIST-1D."""

    def __init__(self, input_shape: tuple[int, ...], channels: list[int] | None = None, kernel_size: int = 5,
                 pool: list[bool] | None = None):
        super().__init__()
        if len(input_shape) != 2:
            raise ValueError(f"cnn1d needs sequence inputs (C, L), got shape {input_shape}")
        channels = list(channels or [32, 64])
        pool = list(pool or [True] * (len(channels) - 1) + [False])
        layers: list[nn.Module] = []
        c_in = input_shape[0]
        for c, p in zip(channels, pool):
            layers += [nn.Conv1d(c_in, c, kernel_size, padding=kernel_size // 2), nn.BatchNorm1d(c), nn.ReLU()]
            if p:
                layers.append(nn.MaxPool1d(2))
            c_in = c
        layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.feature_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
