"""A small ResNet (basic blocks with residual streams) for 2-D images or 1-D sequences, at laptop scale.

It exists so that strategies which reason about a network's structure (trajectory transfer's permutation specs) are
exercised on residual connections, where several layers must share one permutation of their channels.
"""
from __future__ import annotations

import torch
from pydantic import Field, PositiveInt
from torch import nn

from forgetless.backbones.builtin import BackboneParams
from forgetless.backbones.registry import register_backbone


class ResNetParams(BackboneParams):
    widths: list[PositiveInt] = Field(default_factory=lambda: [16, 32], min_length=1, description="stage widths")
    blocks_per_stage: PositiveInt = 1


def _layers(dims: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    if dims == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d
    return nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (identity, or 1x1 conv-BN when the width or resolution changes)."""

    def __init__(self, dims: int, c_in: int, c_out: int, stride: int):
        super().__init__()
        conv, bn, _ = _layers(dims)
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(c_out)
        self.conv2 = conv(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = bn(c_out)
        self.projection = stride != 1 or c_in != c_out
        self.shortcut = (nn.Sequential(conv(c_in, c_out, 1, stride=stride, bias=False), bn(c_out))
                         if self.projection else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """stem (conv-BN-ReLU) -> stages of basic blocks (the first block of every later stage halves the resolution)
    -> global average pooling -> features. 2-D for (C, H, W) inputs, 1-D for (C, L) inputs."""

    def __init__(self, input_shape: tuple[int, ...], widths: list[int] | None = None, blocks_per_stage: int = 1):
        super().__init__()
        if len(input_shape) not in (2, 3):
            raise ValueError(f"resnet needs (C, L) or (C, H, W) inputs, got shape {input_shape}")
        if blocks_per_stage < 1:
            raise ValueError("resnet: blocks_per_stage must be >= 1")
        dims = len(input_shape) - 1
        widths = list(widths or [16, 32])
        conv, bn, pool = _layers(dims)
        self.stem = nn.Sequential(conv(input_shape[0], widths[0], 3, padding=1, bias=False), bn(widths[0]), nn.ReLU())
        stages = []
        c_in = widths[0]
        for s, w in enumerate(widths):
            blocks = [BasicBlock(dims, c_in if b == 0 else w, w, stride=2 if (s > 0 and b == 0) else 1)
                      for b in range(blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
            c_in = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(pool(1), nn.Flatten())
        self.feature_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x)))


register_backbone("resnet", ResNet, ResNetParams)
