"""expanse: widen every layer of a pretrained network (Iman, Miller, Rasheed, Branch, Arabnia, "EXPANSE: A Deep
Continual / Progressive Learning System for Deep Transfer Learning", arXiv 2205.10356).

Confirmed (abstract): expand the pretrained layers with new nodes instead of only stacking layers after a frozen
model; the expanded model stays valid on the source; two-step training (basics first, then complexities).
This project's wiring (an interpretation, see STRATEGIES.md): every Linear / Conv layer with n old units gains
m = ⌈r·n⌉ new units and its weight becomes W' = [[W_oo, 0], [W_no, W_nn]]:
- old units read only old inputs, with the pretrained W_oo frozen (the zero block does not exist as a parameter, so
  it cannot receive a gradient and stays exactly zero);
- new units read old and new inputs (W_no, W_nn and a bias, all trainable); new channels get their own BatchNorm,
  the old BatchNorm (affine and running statistics) is frozen and kept in eval mode;
- the source head reads only the old features, so source predictions are bit-identical to the pretrained model's;
  target heads read old and new features.
The old units are the pretrained modules themselves, unchanged, at their original state-dict keys; the new units form
a parallel stream (`backbone.grow`) that reads both streams. Surgery happens in `build`, before any engine, so it
works under every ZeRO stage.
Two-step training: step 1 trains the new units and the head on clean data, step 2 continues on augmented data
(random shifts and Gaussian noise); each step can be switched off to compare with one-step training.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from forgetless.backbones.transfer_model import head_key
from forgetless.strategies import register
from forgetless.strategies.base import ParamGroup, Phase, Strategy, StrategyParams, TaskInfo, head_params

_CONV = (nn.Conv1d, nn.Conv2d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
# Layers that act on each unit (or channel) separately: the new stream gets its own copy.
_PER_UNIT = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Identity, nn.Dropout, nn.Flatten,
             nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


class GrowLayer(nn.Module):
    """The new rows of an expanded Linear / Conv layer: new units = W_no · old inputs + W_nn · new inputs + b_n."""

    def __init__(self, layer: nn.Module, new_in: int, new_out: int):
        super().__init__()
        old_in = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        # Drawn as one layer over all (old + new) inputs, then split, so the initial scale is that of a fresh layer.
        full = self._like(layer, old_in + new_in, new_out, bias=layer.bias is not None)
        self.from_old = self._like(layer, old_in, new_out, bias=layer.bias is not None)
        self.from_new = self._like(layer, new_in, new_out, bias=False) if new_in else None
        with torch.no_grad():
            self.from_old.weight.copy_(full.weight[:, :old_in])
            if layer.bias is not None:
                self.from_old.bias.copy_(full.bias)
            if self.from_new is not None:
                self.from_new.weight.copy_(full.weight[:, old_in:])
        self.new_out = new_out

    @staticmethod
    def _like(layer: nn.Module, c_in: int, c_out: int, bias: bool) -> nn.Module:
        if isinstance(layer, nn.Linear):
            return nn.Linear(c_in, c_out, bias=bias)
        if layer.groups != 1:
            raise ValueError("expanse: grouped convolutions cannot be expanded")
        return type(layer)(c_in, c_out, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                           dilation=layer.dilation, bias=bias, padding_mode=layer.padding_mode)

    def forward(self, old: torch.Tensor, new: torch.Tensor | None) -> torch.Tensor:
        out = self.from_old(old)
        if self.from_new is not None:
            out = out + self.from_new(new)
        return out


class ExpandedBackbone(nn.Module):
    """A pretrained MLP / CNN body, untouched (`body`: same modules, same keys), plus the new units (`grow`)."""

    def __init__(self, original: nn.Module, ratio: float):
        super().__init__()
        body = getattr(original, "body", None)
        if not isinstance(body, nn.Sequential):
            raise ValueError(f"expanse: backbone {type(original).__name__} has no sequential `body` of layers to "
                             f"widen (supported: mlp, cnn2d, cnn1d)")
        self.body = body
        grow: list[nn.Module] = []
        new_width = 0  # new units of the current tensor; the network input has none
        for i, m in enumerate(body):
            if isinstance(m, (nn.Linear, *_CONV)):
                n_out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
                g = GrowLayer(m, new_width, math.ceil(ratio * n_out))
                new_width = g.new_out
            elif isinstance(m, _BATCHNORM):
                g = type(m)(new_width, eps=m.eps, momentum=m.momentum, affine=m.affine) if new_width else nn.Identity()
            elif isinstance(m, _PER_UNIT):
                g = copy.deepcopy(m)
            else:
                raise ValueError(f"expanse: cannot widen layer body.{i} ({type(m).__name__})")
            grow.append(g)
        self.grow = nn.ModuleList(grow)
        self.old_dim = int(original.feature_dim)
        self.new_dim = new_width
        self.feature_dim = self.old_dim + self.new_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        old, new = x, None
        for layer, g in zip(self.body, self.grow):
            if isinstance(g, GrowLayer):
                new = g(old, new)  # new units read the layer's inputs from both streams
            elif new is not None:
                new = g(new)
            old = layer(old)  # the pretrained layer on the old stream only: exactly the original computation
        return torch.cat([old, new], dim=1)


class OldFeatureHead(nn.Linear):
    """The source head: reads only the old features (the first `in_features`), so its logits are the original's."""

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return F.linear(feats[:, : self.in_features].contiguous(), self.weight, self.bias)


def expand(model: nn.Module, ratio: float, seed: int = 0) -> ExpandedBackbone:
    """Widen `model.backbone` in place (TransferModel); the source head keeps the old features, target heads are
    rebuilt over old + new features. Returns the expanded backbone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same new units on every rank and on every rebuild
        expanded = ExpandedBackbone(model.backbone, ratio)
        for key in list(model.heads):
            old = model.heads[key]
            if key == head_key(0):
                head = OldFeatureHead(old.in_features, old.out_features, bias=old.bias is not None)
                head.load_state_dict(old.state_dict())
            else:
                head = nn.Linear(expanded.feature_dim, old.out_features)
            model.heads[key] = head
    model.backbone = expanded
    # The new units cannot be in pretrained weights; the platform's loader must not count them as missing.
    model.surgery_added_keys = [f"backbone.grow.{k}" for k in expanded.grow.state_dict()]
    return expanded


class ExpanseParams(StrategyParams):
    ratio: float = Field(0.25, gt=0.0, le=10.0, description="new units per old unit of every layer (m = ceil(r n))")
    step1: bool = Field(True, description="step 1: train on clean, un-augmented target data")
    step2: bool = Field(True, description="step 2: continue on augmented target data (shifts + noise)")
    step1_epochs: int | None = Field(None, gt=0, description="default: half of train.epochs (all if step 2 is off)")
    step2_epochs: int | None = Field(None, gt=0, description="default: the rest of train.epochs")
    noise_std: float = Field(0.1, ge=0.0, le=5.0, description="step 2 Gaussian noise, in units of the batch's std")
    max_shift: int = Field(1, ge=0, le=16, description="step 2 random shift of every spatial axis, in positions")
    seed: int = Field(0, description="initialisation of the new units and the target heads")

    @model_validator(mode="after")
    def _one_step_at_least(self) -> "ExpanseParams":
        if not (self.step1 or self.step2):
            raise ValueError("step1 and step2 are both false; enable at least one training step")
        return self


@register
class Expanse(Strategy):
    name = "expanse"
    paper = "Iman et al., EXPANSE: A Deep Continual / Progressive Learning System for Deep Transfer Learning " \
            "(arXiv 2205.10356)"
    fidelity = "interpretation"
    Config = ExpanseParams
    supported_backbones = ("mlp", "cnn2d", "cnn1d")

    def build(self, model, tasks: list[TaskInfo]) -> None:
        expand(model, self.params.ratio, self.params.seed)

    def epochs_per_step(self) -> tuple[int, int]:
        p = self.params
        if p.step1 and p.step2:
            e1 = p.step1_epochs or max(1, self.epochs // 2)
            return e1, p.step2_epochs or max(1, self.epochs - e1)
        return (p.step1_epochs or self.epochs, 0) if p.step1 else (0, p.step2_epochs or self.epochs)

    def phases(self, model, task: TaskInfo) -> list[Phase]:
        groups = [ParamGroup("new_units", list(model.backbone.grow.parameters()), self.lr),
                  ParamGroup("head", head_params(model, task), self.lr)]
        frozen = [model.backbone.body]  # the pretrained stream, BatchNorm statistics included, never trains
        e1, e2 = self.epochs_per_step()
        out = []
        if e1:
            out.append(Phase("step1_clean", e1, groups, eval_modules=frozen))
        if e2:
            out.append(Phase("step2_augmented", e2, groups, eval_modules=frozen, augment=self.augment))
        return out

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Step 2's 'complexities': a random shift of up to `max_shift` positions per spatial axis (zero fill), then
        additive Gaussian noise."""
        p = self.params
        if p.max_shift and x.dim() > 2:
            s, spatial = p.max_shift, x.shape[2:]
            padded = F.pad(x, [s, s] * len(spatial))
            offsets = torch.randint(0, 2 * s + 1, (len(x), len(spatial)), generator=gen).tolist()
            x = torch.stack([padded[i][(slice(None),) + tuple(slice(o, o + n) for o, n in zip(off, spatial))]
                             for i, off in enumerate(offsets)])
        if p.noise_std:
            x = x + p.noise_std * x.std() * torch.randn(x.shape, generator=gen).to(x.device)
        return x

    def tags(self) -> dict[str, str]:
        p = self.params
        e1, e2 = self.epochs_per_step()
        return {**super().tags(), "expanse.ratio": str(p.ratio), "expanse.steps": f"step1={e1},step2={e2}"}
