"""DeepSpeed inside a Ray Train worker: config, one engine per phase, consolidated weights.

Runs on the process group Ray Train created (gloo on CPU, nccl on GPU). On CPU: DS_ACCELERATOR=cpu, fp32 and a torch
optimizer; on GPU: bf16 and fused optimizers.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from forgetless.config import DeepSpeedSpec, OptimConfig
from forgetless.strategies.base import Phase
from forgetless.strategies.optim import make_torch_optimizer
from forgetless.strategies.training import WeightAccess, lr_scheduler, set_trainable


def ensure_accelerator_env(use_gpu: bool) -> None:
    # DeepSpeed picks its accelerator at import time; it must be told before the first import.
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


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
    if spec.gradient_clipping:
        cfg["gradient_clipping"] = spec.gradient_clipping
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True}
    cfg.update(spec.extra)
    return cfg


def make_optimizer(phase: Phase, optim: OptimConfig, use_gpu: bool,
                   offload_optimizer: bool = False) -> torch.optim.Optimizer:
    groups = [{"params": g.params, "lr": g.lr, "name": g.name} for g in phase.param_groups if g.params]
    if offload_optimizer and optim.optimizer in ("adam", "adamw"):
        # ZeRO-Offload steps on the CPU: DeepSpeed refuses a torch optimizer there (too slow); use its CPU Adam.
        # deferred: DeepSpeed picks its accelerator when first imported (ensure_accelerator_env runs first)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=groups[0]["lr"], weight_decay=optim.weight_decay,
                                adamw_mode=optim.optimizer == "adamw")
    return make_torch_optimizer(groups, optim, fused=use_gpu)


def make_engine(model: nn.Module, phase: Phase, optim: OptimConfig, spec: DeepSpeedSpec, world_size: int,
                use_gpu: bool):
    """Build a DeepSpeed engine for one phase; model surgery has already happened on full weights."""
    # deferred: DeepSpeed picks its accelerator when first imported (ensure_accelerator_env runs first)
    import deepspeed

    set_trainable(model, phase)
    optimizer = make_optimizer(phase, optim, use_gpu, offload_optimizer=spec.offload_optimizer != "none")
    scheduler = lr_scheduler(optimizer, phase)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(spec, optim.batch_size, world_size, use_gpu),
        dist_init_required=False,
    )
    return engine


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
        if p.requires_grad and (hasattr(p, "ds_id") or getattr(p, "_hp_mapping", None) is not None):
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
