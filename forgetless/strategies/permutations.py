"""Permutation symmetries of networks and weight matching (pure PyTorch + SciPy).

Reordering the hidden units of a layer (rows of its weight, entries of its bias and BatchNorm, and the matching
columns of the next layer) leaves the network's function unchanged. A `PermutationSpec` says, for every state-dict
entry, which permutation acts on which axis: network inputs and class outputs are never permuted, BatchNorm follows its
channels, and layers joined by a residual connection share one permutation (the residual stream).

`weight_matching` finds the permutation π that maximises Σ_pairs ⟨a, π(b)⟩ by coordinate descent over the permutation
groups, one linear assignment problem per group (the weight-matching algorithm of Git Re-Basin, Ainsworth et al. 2023),
which is what learning transfer (GMT / FGMT) solves on gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import nn

from forgetless.backbones.builtin import CNN1d, CNN2d, MLP
from forgetless.backbones.resnet import ResNet

Perms = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]


class UnsupportedArchitecture(ValueError):
    """The network has a part whose permutation symmetry is not described."""


@dataclass
class PermutationSpec:
    axes: dict[str, tuple[str | None, ...]]  # state-dict key -> the permutation acting on each axis (None: none)
    sizes: dict[str, int]  # permutation name -> number of units it reorders

    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        out: dict[str, list[tuple[str, int]]] = {p: [] for p in self.sizes}
        for key, ax in self.axes.items():
            for i, p in enumerate(ax):
                if p is not None:
                    out[p].append((key, i))
        return out

    def restricted(self, keys: Iterable[str]) -> "PermutationSpec":
        """The spec on a subset of the entries (e.g. the parameters only); permutations nothing uses are dropped."""
        keys = set(keys)
        axes = {k: v for k, v in self.axes.items() if k in keys}
        used = {p for ax in axes.values() for p in ax if p is not None}
        return PermutationSpec(axes, {p: n for p, n in self.sizes.items() if p in used})


# ---------------------------------------------------------------------------------------------------------------------
# specs of the built-in architectures

_ELEMENTWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Identity, nn.Dropout,
                nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)


class _Builder:
    def __init__(self) -> None:
        self.axes: dict[str, tuple[str | None, ...]] = {}
        self.sizes: dict[str, int] = {}

    def layer(self, prefix: str, module: nn.Module, out_perm: str, in_perm: str | None) -> None:
        """A Linear or Conv layer: rows follow `out_perm`, input columns follow `in_perm`."""
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
            raise UnsupportedArchitecture(f"{prefix.rstrip('.')}: grouped convolutions have no permutation spec")
        w = module.weight
        self.axes[prefix + "weight"] = (out_perm, in_perm) + (None,) * (w.dim() - 2)
        if module.bias is not None:
            self.axes[prefix + "bias"] = (out_perm,)
        self.sizes[out_perm] = w.shape[0]

    def batchnorm(self, prefix: str, module: nn.Module, perm: str | None) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(module, name, None) is not None:
                self.axes[prefix + name] = (perm,)
        if getattr(module, "num_batches_tracked", None) is not None:
            self.axes[prefix + "num_batches_tracked"] = ()

    def spec(self) -> PermutationSpec:
        return PermutationSpec(self.axes, self.sizes)


def _sequential(b: _Builder, body: nn.Sequential, prefix: str) -> str | None:
    """MLP / CNN bodies: every Linear or Conv starts a new permutation of its output units; returns the last one."""
    current: str | None = None  # the network input is never permuted
    spatial = False  # True while the current tensor still has spatial positions (a Flatten would mix them in)
    for i, m in enumerate(body):
        key = f"{prefix}{i}."
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            perm = f"{prefix}{i}"
            b.layer(key, m, perm, current)
            current, spatial = perm, isinstance(m, (nn.Conv1d, nn.Conv2d))
        elif isinstance(m, _BATCHNORM):
            b.batchnorm(key, m, current)
        elif isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)):
            size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,)
            spatial = spatial and any(s != 1 for s in size)
        elif isinstance(m, nn.Flatten):
            if current is not None and spatial:
                raise UnsupportedArchitecture(f"{key.rstrip('.')}: flattening channels x positions is not described "
                                              f"by a permutation spec (pool globally before flattening)")
        elif not isinstance(m, _ELEMENTWISE):
            raise UnsupportedArchitecture(f"{key.rstrip('.')}: no permutation rule for {type(m).__name__}")
    return current


def _resnet(b: _Builder, net: nn.Module, prefix: str) -> str:
    """Residual streams: the stem and every block's second conv (and shortcut projection) of a stage write into the
    same stream, so they share the stage's permutation; each block's inner width has its own."""
    conv, bn = net.stem[0], net.stem[1]
    stream = f"{prefix}stream0"
    b.layer(f"{prefix}stem.0.", conv, stream, None)
    b.batchnorm(f"{prefix}stem.1.", bn, stream)
    for s, stage in enumerate(net.stages):
        for k, block in enumerate(stage):
            key = f"{prefix}stages.{s}.{k}."
            in_stream = stream
            # An identity shortcut adds the block's output to its input: both live in the same stream.
            out_stream = f"{prefix}stream{s}.{k}" if block.projection else in_stream
            inner = f"{prefix}stages.{s}.{k}.inner"
            b.layer(key + "conv1.", block.conv1, inner, in_stream)
            b.batchnorm(key + "bn1.", block.bn1, inner)
            b.layer(key + "conv2.", block.conv2, out_stream, inner)
            b.batchnorm(key + "bn2.", block.bn2, out_stream)
            if block.projection:
                b.layer(key + "shortcut.0.", block.shortcut[0], out_stream, in_stream)
                b.batchnorm(key + "shortcut.1.", block.shortcut[1], out_stream)
            stream = out_stream
    return stream


SUPPORTED = ("mlp", "cnn2d", "cnn1d", "resnet")


def spec_for(model: nn.Module) -> PermutationSpec:
    """The permutation spec of a TransferModel (backbone and every head) built on a supported backbone."""
    backbone = model.backbone
    b = _Builder()
    if isinstance(backbone, (MLP, CNN2d, CNN1d)):
        last = _sequential(b, backbone.body, "backbone.body.")
    elif isinstance(backbone, ResNet):
        last = _resnet(b, backbone, "backbone.")
    else:
        raise UnsupportedArchitecture(
            f"no permutation spec for backbone {type(backbone).__name__}: trajectory transfer must know which weight "
            f"axes each hidden-unit permutation acts on; specs exist for {', '.join(SUPPORTED)} "
            f"(add one in forgetless/strategies/permutations.py)")
    if last is None:
        raise UnsupportedArchitecture(f"backbone {type(backbone).__name__} has no hidden units to permute")
    for name in model.heads:
        b.axes[f"heads.{name}.weight"] = (None, last)  # class outputs are never permuted
        b.axes[f"heads.{name}.bias"] = (None,)
    if len(model.input_transforms) or len(model.extras):
        raise UnsupportedArchitecture("input transforms and strategy extras have no permutation spec")
    return b.spec()


# ---------------------------------------------------------------------------------------------------------------------
# applying and finding permutations


def identity(spec: PermutationSpec) -> Perms:
    return {p: torch.arange(n) for p, n in spec.sizes.items()}


def random_permutation(spec: PermutationSpec, generator: torch.Generator | None = None) -> Perms:
    return {p: torch.randperm(n, generator=generator) for p, n in spec.sizes.items()}


def inverse(perms: Perms) -> Perms:
    return {p: torch.argsort(v) for p, v in perms.items()}


def _permute_entry(spec: PermutationSpec, perms: Perms, key: str, value: torch.Tensor,
                   except_axis: int | None = None) -> torch.Tensor:
    for axis, p in enumerate(spec.axes.get(key, ())):
        if p is not None and axis != except_axis:
            value = value.index_select(axis, perms[p].to(value.device))
    return value


def apply_permutation(spec: PermutationSpec, perms: Perms, state: State) -> State:
    """π(state): entries the spec names are reindexed along their permuted axes, the others are returned as they are."""
    return {k: _permute_entry(spec, perms, k, v) for k, v in state.items()}


def weight_matching(spec: PermutationSpec, pairs: list[tuple[State, State]], init: Perms | None = None,
                    max_sweeps: int = 100, generator: torch.Generator | None = None) -> Perms:
    """π maximising Σ_(a, b) in pairs Σ_key ⟨a[key], π(b)[key]⟩ (b is permuted to align with a).

    Coordinate descent: for each permutation group p in random order, all other groups fixed, the objective is linear
    in p's assignment: A_p[i, j] = Σ ⟨a restricted to unit i of p, π₋ₚ(b) restricted to unit j⟩; solve it exactly
    (linear_sum_assignment, maximise). Sweeps repeat until one changes nothing (at most `max_sweeps`).
    """
    from scipy.optimize import linear_sum_assignment  # deferred: ~0.7 s to import, paid by every config validation

    perms = {p: v.clone() for p, v in (init or identity(spec)).items()}
    p2a = spec.perm_to_axes()
    names = sorted(spec.sizes)
    for _ in range(max_sweeps):
        improved = False
        for idx in torch.randperm(len(names), generator=generator).tolist():
            p = names[idx]
            n = spec.sizes[p]
            A = torch.zeros(n, n, dtype=torch.float64)
            for a, b in pairs:
                for key, axis in p2a[p]:
                    if key not in a:
                        continue
                    wa = a[key].detach().double().movedim(axis, 0).reshape(n, -1)
                    wb = _permute_entry(spec, perms, key, b[key].detach().double(), except_axis=axis)
                    A += wa @ wb.movedim(axis, 0).reshape(n, -1).T
            _, cols = linear_sum_assignment(A.numpy(), maximize=True)
            rows = np.arange(n)
            old = float(A.numpy()[rows, perms[p].numpy()].sum())
            new = float(A.numpy()[rows, cols].sum())
            # A strict, scale-aware gain: float noise must not make two equally good assignments alternate forever.
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[p] = torch.as_tensor(cols, dtype=torch.long)
                improved = True
        if not improved:
            break
    return perms


def objective(spec: PermutationSpec, perms: Perms, pairs: list[tuple[State, State]]) -> float:
    """Σ_pairs ⟨a, π(b)⟩ over the entries the spec names (what weight_matching maximises)."""
    total = 0.0
    for a, b in pairs:
        pb = apply_permutation(spec, perms, {k: b[k] for k in spec.axes if k in a and k in b})
        total += float(sum((a[k].double() * v.double()).sum() for k, v in pb.items()))
    return total
