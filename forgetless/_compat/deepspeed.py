"""DeepSpeed internals forgetless uses, and their public paths. Written and tested for DeepSpeed 0.19 (range below).
Nothing here imports DeepSpeed at its own import: DeepSpeed picks its accelerator when first imported, which the
worker decides first (platform/worker/engine.ensure_accelerator_env).

- `import_muon_without_compiling`: imports `deepspeed.runtime.zero.muon.muon_optimizer` (a module every ZeRO >= 1
  engine imports to check for Muon) with `torch.compile` replaced by a no-op while it imports, so that its
  module-level `@torch.compile` does not import torch's inductor. Public path: DeepSpeed imports it itself (2.8 s more
  per worker process, the first engine: benchmarks/fixed_cost.py `engine_init`).
- `has_master_copy`: whether DeepSpeed steps an fp32 master copy of a parameter (its ZeRO-3 `ds_id`, ZeRO-1/2 and
  bf16 `_hp_mapping`). Public path: every trainable weight is handed to `deepspeed.utils.safe_set_full_fp32_param`,
  which skips those without one (an fp32 copy of each trainable weight is made per rewrite, also where DeepSpeed keeps
  no master copy).
- the ZeRO-3 partition layout: `local_partition` (a rank's flat slice `ds_tensor`: elements [rank * n, (rank + 1) * n)
  of the flattened tensor, zero-padded at the end) and `full_shape` (`ds_shape`). Public path: each parameter is
  gathered (`deepspeed.zero.GatheredParameters`) and sliced, or written whole through rank 0, by
  platform/worker/zero3_partitions.py (a collective per parameter; at most one full parameter per rank at a time).
- `skip_one_rank_allreduce`: turns off the engine's gradient all-reduce (`enable_backward_allreduce`, the flag
  DeepSpeed's pipeline engine sets) for a ZeRO-0 engine of one rank, where it would flatten every gradient into a
  buffer, "average" it over one rank and copy it back after each backward (~5 % of a 10 M decoder's step on CPU,
  benchmarks/lm_step_cost.py). Public path: DeepSpeed's all-reduce of one rank stays.
- resuming on another worker count (`reshard_supported`, `zero_param_shapes`): platform/worker/reshard.py reads the
  per-rank optimizer files in DeepSpeed 0.19's layout (ZeRO-1/2: each group's parameters flattened and cut into equal
  partitions; ZeRO-3: each parameter cut into equal slices) and lays them out in the order the engine's
  `_get_zero_param_shapes` gives. Public path: none short of DeepSpeed's universal checkpoints (an offline conversion
  that unpickles with weights_only=False): a resume on another worker count is refused, naming the count to use.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

from forgetless._compat import Seam

LOW, BELOW = "0.19", "0.20"  # written and tested with 0.19.8

MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def _probe() -> bool:
    import deepspeed  # (imported by the caller already: every use is in a worker that runs DeepSpeed)

    return importlib.util.find_spec(MUON_MODULE) is not None and hasattr(deepspeed.zero, "Init")


SEAM = Seam("DeepSpeed", "deepspeed", LOW, BELOW, probe=_probe,
            slower="each worker's first engine imports torch's inductor (~2.8 s) and ZeRO-3 checkpoints gather each "
                   "parameter")


def import_muon_without_compiling() -> None:
    """Import DeepSpeed's Muon optimizer module with torch.compile as a no-op decorator (forgetless builds its
    optimizers itself and never uses Muon, so Muon's kernels may stay eager). A no-op on the public path, or once the
    module is imported."""
    if MUON_MODULE in sys.modules or not SEAM.active():
        return
    import torch

    compile_fn = torch.compile
    torch.compile = _eager_compile  # type: ignore[assignment]
    try:
        importlib.import_module(MUON_MODULE)
    except ImportError:
        pass
    finally:
        torch.compile = compile_fn  # type: ignore[assignment]


def _eager_compile(model=None, **kwargs):
    """torch.compile's signature, compiling nothing: `@torch.compile` and `@torch.compile(...)` return the function."""
    return model if model is not None else (lambda fn: fn)


def has_master_copy(p: Any) -> bool:
    """Whether DeepSpeed keeps (and steps) an fp32 master copy of parameter `p`, which it copies over `p` at the next
    step: then an in-place rewrite of `p` must be pushed into it (deepspeed.utils.safe_set_full_fp32_param)."""
    if SEAM.active():
        return hasattr(p, "ds_id") or getattr(p, "_hp_mapping", None) is not None
    return True  # public path: safe_set_full_fp32_param itself skips a weight without a master copy


def partition_layout_known() -> bool:
    """Whether `local_partition` / `full_shape` may be used (else: gather, zero3_partitions' public path)."""
    return SEAM.active()


def local_partition(p: Any):
    """This rank's flat slice of ZeRO-3 parameter `p` (DeepSpeed's `ds_tensor`), to read or write in place."""
    return p.ds_tensor


def full_shape(p: Any) -> tuple[int, ...]:
    """The full shape of ZeRO-3 parameter `p` (DeepSpeed's `ds_shape`; `p.shape` is empty while partitioned)."""
    return tuple(p.ds_shape)


def is_partitioned(p: Any) -> bool:
    """Whether `p` is a ZeRO-3 parameter (its `ds_id`: how DeepSpeed's own public helpers, e.g.
    `deepspeed.utils.safe_get_full_fp32_param`, tell; the same on both paths)."""
    return hasattr(p, "ds_id")


def reshard_supported() -> bool:
    """Whether a checkpoint may be re-cut for another number of ranks (platform/worker/reshard.py reads DeepSpeed
    0.19's per-rank file layout and the engine's flat-tensor order below); off, a resume on another worker count is
    refused (there is no public path short of DeepSpeed's universal-checkpoint conversion)."""
    return SEAM.active()


def zero_param_shapes(engine: Any) -> list[dict[str, Any]]:
    """The order in which `engine`'s optimizer lays its trained parameters into each (sub-)group's flat fp32 tensor:
    name -> shape per group, as DeepSpeed itself saves it into a checkpoint (`param_shapes`, from the engine's
    `_get_zero_param_shapes`)."""
    return engine._get_zero_param_shapes()


def skip_one_rank_allreduce(engine: Any, zero_stage: int, world_size: int) -> None:
    """For a ZeRO-0 engine of one rank, skip DeepSpeed's gradient all-reduce: over one rank it changes no gradient
    (a sum of one, divided by one) and costs copies of all of them. ZeRO >= 1 is left as it is: there the reduction
    also fills the optimizer's own gradient partitions."""
    if SEAM.active() and zero_stage == 0 and world_size == 1 and hasattr(engine, "enable_backward_allreduce"):
        engine.enable_backward_allreduce = False
