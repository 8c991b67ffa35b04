"""DeepSpeed inside a Ray Train worker: config, one engine per phase, consolidated weights.

Runs on the process group Ray Train created (gloo on CPU, nccl on GPU). On CPU: DS_ACCELERATOR=cpu and fp32; on GPU:
bf16. A torch optimizer on both, Adam/AdamW with torch's fused kernel (on CPU too, as Hugging Face Trainer's default
`adamw_torch_fused`).
"""
from __future__ import annotations

import difflib
import os
import sys
from collections.abc import KeysView
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from forgetless._compat import deepspeed as compat_deepspeed
from forgetless.config import DeepSpeedSpec, OptimConfig
from forgetless.strategies.base import Phase
from forgetless.strategies.optim import make_torch_optimizer
from forgetless.strategies.training import WeightAccess, lr_scheduler, set_trainable


def ensure_accelerator_env(use_gpu: bool) -> None:
    # DeepSpeed picks its accelerator at import time; it must be told before the first import.
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


@contextmanager
def accelerator_env(use_gpu: bool):
    """`ensure_accelerator_env` inside the block only: for the driver (the Python API leaves the caller's environment
    as it was; DeepSpeed keeps the accelerator it picked on its first import)."""
    before = os.environ.get("DS_ACCELERATOR")
    ensure_accelerator_env(use_gpu)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DS_ACCELERATOR", None)


def resolve_precision(spec: DeepSpeedSpec, use_gpu: bool) -> str:
    if spec.precision == "auto":
        return "bf16" if use_gpu else "fp32"
    return spec.precision


def deepspeed_config(spec: DeepSpeedSpec, micro_batch: int, world_size: int, use_gpu: bool) -> dict[str, Any]:
    precision = resolve_precision(spec, use_gpu)
    zero: dict[str, Any] = {"stage": spec.zero_stage}
    if spec.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": spec.offload_optimizer}
    if spec.offload_param != "none":
        zero["offload_param"] = {"device": spec.offload_param}
    if spec.zero_stage == 3:
        # Small models: do not keep parameters gathered across modules (keeps ZeRO-3 behaviour honest in tests).
        zero.setdefault("stage3_param_persistence_threshold", 0)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": spec.gradient_accumulation_steps,
        "train_batch_size": micro_batch * spec.gradient_accumulation_steps * world_size,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # With optimizer offload, SGD has no DeepSpeed CPU version: let the torch one run there (Adam uses CPU Adam).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    # Always written: DeepSpeed clips at norm 1.0 where the key is absent, so leaving it out for 0 clipped every run.
    cfg["gradient_clipping"] = spec.gradient_clipping
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True}
    for key, value in spec.extra.items():
        # A section the platform fills too (zero_optimization, bf16) is merged key by key, so that e.g.
        # extra: {zero_optimization: {reduce_bucket_size: ...}} keeps the configured ZeRO stage.
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


# The DeepSpeed keys forgetless sets from its own fields (deepspeed_config), with the field to set instead: in
# deepspeed.extra they would contradict those fields or the optimizer and schedule the strategy's phases build.
PLATFORM_DEEPSPEED_KEYS = {
    "train_batch_size": "train.batch_size (times deepspeed.gradient_accumulation_steps and the workers)",
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "deepspeed.gradient_accumulation_steps",
    "gradient_clipping": "deepspeed.gradient_clipping",
    "optimizer": "train.optimizer and train.lr",
    "scheduler": "the strategy's params (its phases set the learning-rate schedule)",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param": "deepspeed.offload_param",
    "bf16.enabled": "deepspeed.precision",
    "fp16.enabled": "deepspeed.precision",
}


class _ReadRecorder(dict):
    """A DeepSpeed config dict that records which top-level keys DeepSpeed reads, with the default it reads them
    with: DeepSpeed ignores keys it does not know, so what it reads is the list of keys that exist."""

    def __init__(self, data: dict[str, Any], read: dict[str, Any] | None = None):
        super().__init__(data)
        self.read: dict[str, Any] = {} if read is None else read

    def _record(self, key: Any, default: Any = None) -> None:
        if self.read.get(key) is None:
            self.read[key] = default

    def get(self, key: Any, default: Any = None) -> Any:
        self._record(key, default)
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self._record(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self._record(key)
        return super().__contains__(key)

    def keys(self):  # `KEY in config.keys()` is how several DeepSpeed sections test for themselves
        return KeysView(self)

    def __copy__(self) -> "_ReadRecorder":  # DeepSpeedConfig reads a copy; the record is shared
        return _ReadRecorder(self, self.read)


def check_deepspeed_extra(spec: DeepSpeedSpec, use_gpu: bool) -> None:
    """Refuse, before anything starts, a `deepspeed.extra` that DeepSpeed would refuse at `initialize` in every worker,
    or silently ignore (a misspelt key). ValueError naming the key; no process group is needed (DeepSpeed's config
    falls back to rank 0 of 1 without one)."""
    for key, value in spec.extra.items():
        _check_not_platform_key(key, value)
    with accelerator_env(use_gpu):  # (in the driver: its environment as it was afterwards)
        # deferred: DeepSpeed picks its accelerator when first imported, and the import takes seconds that only a
        # config with deepspeed.extra needs
        from deepspeed.runtime.config import DeepSpeedConfig

    own = deepspeed_config(spec.model_copy(update={"extra": {}}), 1, 1, use_gpu)
    known = _ReadRecorder(own)
    DeepSpeedConfig(known)  # the platform's own config: records every top-level key DeepSpeed reads
    for key, value in spec.extra.items():
        if key not in known.read:
            close = difflib.get_close_matches(key, [k for k in known.read if isinstance(k, str)], n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see DeepSpeed's configuration reference"
            raise ValueError(f"deepspeed.extra.{key}: DeepSpeed has no such setting (it would ignore it); {hint}")
        example = known.read[key] if known.read[key] is not None else own.get(key)
        if not _same_kind(value, example):
            raise ValueError(f"deepspeed.extra.{key}: expected {_kind_name(example)} (like {example!r}), "
                             f"got {value!r}")
    try:
        DeepSpeedConfig(deepspeed_config(spec, 1, 1, use_gpu))
    except Exception as e:  # noqa: BLE001 - DeepSpeed refuses with pydantic errors, asserts, TypeErrors, its own type
        raise ValueError(f"deepspeed.extra: DeepSpeed refuses it: {_deepspeed_problem(e)}; fix or remove that key") \
            from None


def _check_not_platform_key(key: str, value: Any) -> None:
    owned = [key] if key in PLATFORM_DEEPSPEED_KEYS else []
    if isinstance(value, dict):
        owned += [f"{key}.{k}" for k in value if f"{key}.{k}" in PLATFORM_DEEPSPEED_KEYS]
    if owned:
        raise ValueError(f"deepspeed.extra.{owned[0]}: forgetless sets it itself; set "
                         f"{PLATFORM_DEEPSPEED_KEYS[owned[0]]} instead")


def _same_kind(value: Any, default: Any) -> bool:
    if default is None:
        return True  # DeepSpeed gives no default to compare with; its own config check below decides
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and (isinstance(default, float) or isinstance(value, int))
    return isinstance(value, type(default))


def _kind_name(default: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
            list: "a list"}.get(type(default), type(default).__name__)


def _deepspeed_problem(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):  # pydantic: name the section's model and the field
        err = errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        return f"{getattr(e, 'title', 'config')}.{loc}: {err.get('msg')} (got {err.get('input')!r})"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else 'invalid'}"


def make_optimizer(phase: Phase, optim: OptimConfig,
                   offload_optimizer: bool = False) -> torch.optim.Optimizer:
    groups = [{"params": g.params, "lr": g.lr, "name": g.name} for g in phase.param_groups if g.params]
    if offload_optimizer and optim.optimizer in ("adam", "adamw"):
        # ZeRO-Offload steps on the CPU: DeepSpeed refuses a torch optimizer there (too slow); use its CPU Adam.
        # deferred: DeepSpeed picks its accelerator when first imported (ensure_accelerator_env runs first)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=groups[0]["lr"], weight_decay=optim.weight_decay,
                                adamw_mode=optim.optimizer == "adamw")
    # Fused on CPU too: one pass over each tensor instead of ~6, and ZeRO-1/2 step one flat tensor of every weight,
    # which the unfused kernels stream through memory once per operation (4x slower on CPU, benchmarks/lm_step_cost.py)
    return make_torch_optimizer(groups, optim, fused=True)


def engine_zero_stage(spec: DeepSpeedSpec, worker_counts: range, use_gpu: bool) -> int:
    """The ZeRO stage a run's engines run at: the configured one, but ZeRO-0 for ZeRO-1/2 where the run only ever has
    one worker (`worker_counts`, the counts it may train on), in fp32 and without offload. One rank has nothing to
    partition, and ZeRO-1/2 would still copy every gradient into flat buffers, step a flat fp32 copy of the weights
    and copy it back (~5 % of a small decoder's CPU step, benchmarks/lm_step_cost.py). The training is the same
    (tests/test_engine_stage.py); its checkpoints are ZeRO-0's, which every later attempt of the run (one worker
    again: the count is part of its identity) reads. bf16/fp16 keep the stage: ZeRO-0 there trains through another
    optimizer wrapper. ZeRO-3 keeps it too (partitioned construction, exports)."""
    if (spec.zero_stage in (1, 2) and list(worker_counts) == [1] and resolve_precision(spec, use_gpu) == "fp32"
            and spec.offload_optimizer == "none" and spec.offload_param == "none"):
        return 0
    return spec.zero_stage


def make_engine(model: nn.Module, phase: Phase, optim: OptimConfig, spec: DeepSpeedSpec, world_size: int,
                use_gpu: bool):
    """Build a DeepSpeed engine for one phase; model surgery has already happened on full weights."""
    # deferred: DeepSpeed picks its accelerator when first imported (ensure_accelerator_env runs first)
    import deepspeed

    import_muon_without_compiling()
    set_trainable(model, phase)
    optimizer = make_optimizer(phase, optim, offload_optimizer=spec.offload_optimizer != "none")
    scheduler = lr_scheduler(optimizer, phase)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(spec, optim.batch_size, world_size, use_gpu),
        dist_init_required=False,
    )
    compat_deepspeed.skip_one_rank_allreduce(engine, spec.zero_stage, world_size)
    return engine


def destroy_engine(engine) -> None:
    """Free an engine's optimizer states and gradient buffers now and give the memory back to the system.
    The engine's hooks and optimizer form reference cycles (freed only by a collection), and glibc keeps freed heap
    pages in its arenas, so without the trim a worker's resident memory stayed at its training peak (~6 GB for a
    0.3B model under Adam, benchmarks/memory.py) through the next phase or the export."""
    import gc

    engine.destroy()  # its hooks leave the module, so the next engine's are the only ones
    gc.collect()
    release_free_memory()


def release_free_memory() -> None:
    """Return freed heap memory to the system (glibc's malloc_trim; a no-op elsewhere)."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols, libc's among them
    except AttributeError:  # not glibc (musl has no malloc_trim): nothing to give back this way
        pass


def import_muon_without_compiling() -> None:
    """Import DeepSpeed's Muon optimizer module with torch.compile as a no-op decorator: every engine with ZeRO >= 1
    (and DeepSpeed's bf16 optimizer) imports that module to check whether the optimizer is Muon, and its module-level
    @torch.compile decorators import torch's inductor: 2.8 s per worker process on first use
    (benchmarks/fixed_cost.py, `engine_init`). forgetless builds its optimizers itself (make_optimizer) and never
    uses Muon. DeepSpeed's module layout is an internal: _compat/deepspeed.py (its public path skips this)."""
    compat_deepspeed.import_muon_without_compiling()


@contextmanager
def gathered(module: nn.Module, zero_stage: int, modifier_rank: int | None = None):
    """Full weights of `module` inside the block (a no-op below ZeRO-3). Every rank must enter it (a collective)."""
    if zero_stage == 3:
        # deferred: DeepSpeed picks its accelerator when first imported (ensure_accelerator_env runs first)
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=modifier_rank):
            yield
    else:
        yield


def write_back_weights(module: nn.Module) -> None:
    """Make in-place rewrites of trainable weights stick (a phase's after_step hook, e.g. capping an update).

    DeepSpeed steps its own fp32 master copy under ZeRO-1/2/3 (and bf16/fp16) and copies it over the module's weights
    at the next step, which would silently undo the rewrite; this pushes the module's current values into that copy.
    Under ZeRO-3 call it inside `gathered(...)` (full weights). A no-op for a plain fp32 optimizer (ZeRO-0).
    """
    # deferred: DeepSpeed picks its accelerator when first imported (ensure_accelerator_env runs first)
    from deepspeed.utils import safe_set_full_fp32_param

    for p in module.parameters():
        if p.requires_grad and compat_deepspeed.has_master_copy(p):
            safe_set_full_fp32_param(p, p.data.detach().float().clone())


def weight_access(module: nn.Module, zero_stage: int) -> WeightAccess:
    """How a phase's hooks read and rewrite `module`'s weights inside a DeepSpeed engine (see train_step)."""
    return WeightAccess(full=lambda: gathered(module, zero_stage), commit=lambda: write_back_weights(module))


def _cpu_fp32_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
            for k, v in module.state_dict().items()}


def full_state_dict(module: nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 copy of the full state dict on every rank (gathered under ZeRO-3)."""
    with gathered(module, zero_stage):
        return _cpu_fp32_copy(module)


def consolidated_state_dict(module: nn.Module, zero_stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """fp32 copy of the full state dict on rank 0 (gathered on all ranks under ZeRO-3); None on other ranks."""
    with gathered(module, zero_stage):
        return _cpu_fp32_copy(module) if rank == 0 else None


# The ZeRO-3 partition functions live in zero3_partitions.py; these names stay importable from here (train_loop's
# `ds.partitioned_construction`, ...).
from forgetless.platform.worker.zero3_partitions import (  # noqa: E402,F401 - re-exported
    gathering_forward, is_partitioned, load_full_into_partitions, load_partition_state, partition_state,
    partitioned_construction, streamed_state_dict)
