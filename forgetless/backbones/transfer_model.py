"""TransferModel: a backbone, one head per task of the stream, and optional per-task input transforms.

All structure for the whole stream is created up front (seeded), so any task can be evaluated at any stage (row 0 of
the accuracy matrix needs every head) and a checkpoint restores into a freshly built model with the same keys.
Strategies change the structure (widen the backbone, add input transforms, keep frozen copies) before training.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def head_key(task_index: int) -> str:
    return f"t{task_index}"


class TransferModel(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: Sequence[int], seed: int = 0):
        super().__init__()
        self.backbone = backbone
        self.num_classes = list(num_classes)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed + 7919)  # heads get the same init on every rank and on every rebuild
        # A backbone may own its heads' kind (a language model's vocabulary bias); default: a linear layer.
        make_head = getattr(backbone, "make_head", lambda c: None)
        self.heads = nn.ModuleDict({head_key(i): make_head(c) or nn.Linear(backbone.feature_dim, c)
                                    for i, c in enumerate(num_classes)})
        torch.random.set_rng_state(gen_state)
        # Per-task input transforms (input-space tuning); a task without one sees its raw input.
        self.input_transforms = nn.ModuleDict()
        # Strategy-owned modules and buffers (frozen copies, Fisher information, anchors...): saved with the model.
        self.extras = nn.ModuleDict()

    def features(self, x: torch.Tensor, task: int) -> torch.Tensor:
        key = head_key(task)
        if key in self.input_transforms:
            transform = self.input_transforms[key]
            if getattr(transform, "is_prefix", False):
                # a soft prompt: vectors the backbone puts in front of the input's embeddings (its forward returns them)
                return self.backbone(x, prefix=transform())
            x = transform(x)
        return self.backbone(x)

    def head_features(self, feats: torch.Tensor, task: int) -> torch.Tensor:
        """Which part of the features a task's head reads (EXPANSE's source head reads only the old units)."""
        return feats

    def forward(self, x: torch.Tensor, task: int | Sequence[int]) -> torch.Tensor:
        if isinstance(task, int):
            return self.heads[head_key(task)](self.head_features(self.features(x, task), task))
        # Several tasks: concatenated logits (class-incremental prediction). Features are shared when inputs are.
        cache: dict[str, torch.Tensor] = {}
        out = []
        for t in task:
            k = head_key(t) if head_key(t) in self.input_transforms else "_raw"
            if k not in cache:
                cache[k] = self.features(x, t)
            out.append(self.heads[head_key(t)](self.head_features(cache[k], t)))
        return torch.cat(out, dim=1)
