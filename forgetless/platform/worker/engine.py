"""DeepSpeed inside a Ray Train worker: config, one engine per phase, consolidated weights.

Runs on the process group Ray Train created (gloo on CPU, nccl on GPU). On CPU: DS_ACCELERATOR=cpu, fp32 and a torch
optimizer; on GPU: bf16 and fused optimizers.
"""
from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import KeysView
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
    ensure_accelerator_env(use_gpu)
    # deferred: DeepSpeed picks its accelerator when first imported (ensure_accelerator_env runs first), and the import
    # takes seconds that only a config with deepspeed.extra needs
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

    import_muon_without_compiling()
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
    """Import DeepSpeed's Muon optimizer module with torch.compile as a no-op decorator.

    Why: every engine with ZeRO >= 1 (and DeepSpeed's bf16 optimizer) imports that module to check whether the
    optimizer is Muon, and its module-level @torch.compile decorators import torch's inductor: 2.8 s per worker
    process on first use (benchmarks/fixed_cost.py, `engine_init`). forgetless builds its optimizers itself
    (make_optimizer) and never uses Muon, so Muon's kernels may stay eager. A DeepSpeed without that module: nothing
    to do."""
    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    if name in sys.modules:
        return
    compile_fn = torch.compile
    torch.compile = _eager_compile  # type: ignore[assignment]
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    finally:
        torch.compile = compile_fn  # type: ignore[assignment]


def _eager_compile(model=None, **kwargs):
    """torch.compile's signature, compiling nothing: `@torch.compile` and `@torch.compile(...)` return the function."""
    return model if model is not None else (lambda fn: fn)


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


# -- ZeRO-3 partitions: built, kept, saved and exported without a full copy per rank ---------------------------------
# A parameter built under `partitioned_construction` (or converted by a ZeRO-3 engine) keeps only its flat slice
# `ds_tensor` on each rank: elements [rank * n, (rank + 1) * n) of the flattened full tensor, zero-padded at the end
# (n = ds_tensor.numel()). These helpers work on those slices directly, so nothing below ever holds a full model on a
# rank, except `streamed_state_dict` on rank 0 (the one export at the end of a run).


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


@contextmanager
def partitioned_construction(ds_config: dict[str, Any]):
    """Modules built inside the block are ZeRO-3 partitions from the start (`deepspeed.zero.Init`): no rank ever holds
    the full model. A Hugging Face `from_pretrained` inside it sees the DeepSpeed config (transformers' own ZeRO-3
    integration) and reads the folder's safetensors shards one at a time into the partitions. Every rank must enter it
    (construction broadcasts and partitions collectively)."""
    # deferred: DeepSpeed picks its accelerator when first imported (ensure_accelerator_env runs first)
    import deepspeed
    # zero.Init replaces torch's tensor constructors while it is open; torch._dynamo, which transformers' model code
    # imports on first use, fails to import under that patch ("Signature mismatch ... tensor_pynew"): import it first.
    import torch._dynamo  # noqa: F401

    try:
        # deferred: transformers is optional; the config object must stay referenced while models are built
        from transformers.integrations import HfDeepSpeedConfig

        hf_config = HfDeepSpeedConfig(ds_config)
    except ImportError:
        hf_config = None
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        yield
    del hf_config  # transformers keeps only a weak reference: ZeRO-3 is "off" for it again from here


def partition_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's slices of every partitioned parameter, plus every other parameter and buffer in full (what a
    ZeRO-3 rank saves: about 1/N of the model)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        local = t.ds_tensor if is_partitioned(t) else t
        out[name] = local.detach().cpu().clone()
    return out


def load_partition_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put back what `partition_state` saved on this rank (same world size, same model)."""
    entries = module.state_dict(keep_vars=True)
    missing = sorted(set(entries) - set(state))
    if missing:
        raise ValueError(f"partitioned checkpoint lacks {missing[:5]}")
    with torch.no_grad():
        for name, t in entries.items():
            local = t.ds_tensor if is_partitioned(t) else t
            if local.shape != state[name].shape:
                raise ValueError(f"partitioned checkpoint: {name} has shape {tuple(state[name].shape)} here "
                                 f"{tuple(local.shape)}; was it saved with another number of workers?")
            local.copy_(state[name])


def load_full_into_partitions(module: nn.Module, state: dict[str, torch.Tensor], rank: int,
                              strict: bool = False) -> tuple[list[str], list[str]]:
    """Load a full state dict (e.g. memory-mapped from a file) into a partitioned module: each rank copies only its
    own slice of each tensor, so nothing is gathered and no full copy is made. Returns (missing, unexpected) keys."""
    entries = module.state_dict(keep_vars=True)
    missing = [k for k in entries if k not in state]
    unexpected = [k for k in state if k not in entries]
    if strict and (missing or unexpected):
        raise ValueError(f"state dict does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, t in entries.items():
            if name not in state:
                continue
            if not is_partitioned(t):
                t.copy_(state[name])
                continue
            if tuple(state[name].shape) != tuple(t.ds_shape):
                raise ValueError(f"{name}: shape {tuple(state[name].shape)} does not fit {tuple(t.ds_shape)}")
            n = t.ds_tensor.numel()
            flat = state[name].reshape(-1)
            piece = flat[rank * n: (rank + 1) * n]
            t.ds_tensor.zero_()
            t.ds_tensor[: piece.numel()].copy_(piece)
    return missing, unexpected


def streamed_state_dict(module: nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0 only, gathered one parameter at a time (every rank holds at most one full
    parameter beyond its partition); None on other ranks. Every rank must call it (a collective per parameter).
    Tensors keep the weights' own dtype (bf16 under bf16 training)."""
    # deferred: DeepSpeed picks its accelerator when first imported
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if is_partitioned(t):
            with deepspeed.zero.GatheredParameters([t]):
                if rank == 0:
                    out[name] = t.detach().cpu().clone()
        elif rank == 0:
            out[name] = t.detach().cpu().clone()
    return out if rank == 0 else None


@contextmanager
def gathering_forward(module: nn.Module):
    """Forward passes of a partitioned module outside any engine (evaluation between phases): each submodule gathers
    its own parameters just before its forward and releases them after, as a ZeRO-3 engine does, so a rank holds one
    layer at a time. Every rank must run the same forwards (collectives)."""
    # deferred: DeepSpeed picks its accelerator when first imported
    import deepspeed

    opened: list[Any] = []
    handles = []

    def before(m: nn.Module, _args: Any) -> None:
        ctx = deepspeed.zero.GatheredParameters(list(m.parameters(recurse=False)))
        ctx.__enter__()
        opened.append(ctx)

    def after(m: nn.Module, _args: Any, _out: Any) -> None:
        opened.pop().__exit__(None, None, None)

    for m in module.modules():
        if any(is_partitioned(p) for p in m.parameters(recurse=False)):
            handles += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        while opened:
            opened.pop().__exit__(None, None, None)
