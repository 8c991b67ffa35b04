"""torch internals forgetless uses, and their public path. Written and tested for torch 2.13 (range below).

- `import_dynamo`: `import torch._dynamo` before DeepSpeed's `zero.Init` opens. zero.Init replaces torch's tensor
  constructors while it is open, and torch._dynamo, which transformers' model code imports on first use, fails to
  import under that patch ("Signature mismatch ... tensor_pynew"). Public path: `torch.compiler.reset()`, whose
  import of torch._dynamo does the same (it also clears Dynamo's caches: nothing is compiled yet at that point).
"""
from __future__ import annotations

import importlib
import importlib.util

from forgetless._compat import Seam

LOW, BELOW = "2.13", "2.14"  # written and tested with 2.13.0 (CPU)

SEAM = Seam("torch", "torch", LOW, BELOW, slower="nothing measurable (Dynamo's empty caches are cleared)",
            probe=lambda: importlib.util.find_spec("torch._dynamo") is not None)


def import_dynamo() -> None:
    """torch._dynamo imported (before DeepSpeed patches torch's constructors)."""
    if SEAM.active():
        importlib.import_module("torch._dynamo")
        return
    import torch.compiler

    torch.compiler.reset()


def batch_norm_types() -> tuple[type, ...]:
    """The classes of every BatchNorm layer (their running statistics): torch's private base `_BatchNorm`. Public
    path: torch's BatchNorm classes by name (the same layers; a new kind of BatchNorm would be missed)."""
    from torch import nn

    base = nn.modules.batchnorm.__dict__.get("_BatchNorm")
    if SEAM.active() and isinstance(base, type):
        return (base,)
    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
            nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)
