"""ZeRO-3 partitions: built, kept, saved and exported without a full copy of the model per rank.

A parameter built under `partitioned_construction` (or converted by a ZeRO-3 engine) keeps only its flat slice on each
rank: elements [rank * n, (rank + 1) * n) of the flattened full tensor, zero-padded at the end (n = ceil(numel /
world size)). These helpers work on those slices directly (DeepSpeed's `ds_tensor`, an internal: _compat/deepspeed.py),
so nothing below ever holds a full model on a rank, except `streamed_state_dict` on rank 0 (the one export at the end
of a run). On DeepSpeed's public path the same slices are cut from each parameter gathered in turn (a collective per
parameter, one full parameter at a time): the checkpoints are the same either way.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from forgetless._compat import deepspeed as compat_deepspeed
from forgetless._compat import torch as compat_torch


def is_partitioned(p: torch.Tensor) -> bool:
    return compat_deepspeed.is_partitioned(p)


@contextmanager
def partitioned_construction(ds_config: dict[str, Any]):
    """Modules built inside the block are ZeRO-3 partitions from the start (`deepspeed.zero.Init`): no rank ever holds
    the full model. A Hugging Face `from_pretrained` inside it sees the DeepSpeed config (transformers' own ZeRO-3
    integration) and reads the folder's safetensors shards one at a time into the partitions. Every rank must enter it
    (construction broadcasts and partitions collectively)."""
    # deferred: DeepSpeed picks its accelerator when first imported (ensure_accelerator_env runs first)
    import deepspeed

    # zero.Init replaces torch's tensor constructors while it is open; torch._dynamo, which transformers' model code
    # imports on first use, fails to import under that patch: imported first (_compat/torch.py)
    compat_torch.import_dynamo()
    try:
        # deferred: transformers is optional; the config object must stay referenced while models are built
        from transformers.integrations import HfDeepSpeedConfig

        hf_config = HfDeepSpeedConfig(ds_config)
    except ImportError:
        hf_config = None
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        yield
    del hf_config  # transformers keeps only a weak reference: ZeRO-3 is "off" for it again from here


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _gathered_slice(t: torch.Tensor) -> torch.Tensor:
    """The public path's `local_partition(t)` (a copy): t gathered, this rank's zero-padded slice of it cut."""
    import deepspeed

    rank, world = _rank_and_world()
    with deepspeed.zero.GatheredParameters([t]):
        flat = t.data.detach().reshape(-1)
        n = -(-flat.numel() // world)
        out = torch.zeros(n, dtype=flat.dtype)
        piece = flat[rank * n: (rank + 1) * n].cpu()
        out[: piece.numel()] = piece
    return out


def _write_whole(t: torch.Tensor, full_of: Any) -> None:
    """The public path's write into a partitioned `t`: gathered, `full_of(gathered tensor)` copied in on rank 0 and
    partitioned again from there. Every rank must call it (a collective)."""
    import deepspeed

    rank, _ = _rank_and_world()
    with deepspeed.zero.GatheredParameters([t], modifier_rank=0):
        full = full_of(t.data)
        if rank == 0:
            t.data.copy_(full)


def partition_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's slices of every partitioned parameter, plus every other parameter and buffer in full (what a
    ZeRO-3 rank saves: about 1/N of the model)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if not is_partitioned(t):
            out[name] = t.detach().cpu().clone()
        elif compat_deepspeed.partition_layout_known():
            out[name] = compat_deepspeed.local_partition(t).detach().cpu().clone()
        else:
            out[name] = _gathered_slice(t)
    return out


def load_partition_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put back what `partition_state` saved on this rank (same world size, same model)."""
    entries = module.state_dict(keep_vars=True)
    missing = sorted(set(entries) - set(state))
    if missing:
        raise ValueError(f"partitioned checkpoint lacks {missing[:5]}")
    with torch.no_grad():
        for name, t in entries.items():
            if is_partitioned(t) and not compat_deepspeed.partition_layout_known():
                _load_slice_public(name, t, state[name])
                continue
            local = compat_deepspeed.local_partition(t) if is_partitioned(t) else t
            _check_slice_shape(name, tuple(local.shape), state[name])
            local.copy_(state[name])


def _check_slice_shape(name: str, here: tuple[int, ...], saved: torch.Tensor) -> None:
    if here != tuple(saved.shape):
        raise ValueError(f"partitioned checkpoint: {name} has shape {tuple(saved.shape)} here {here}; was it saved "
                         f"with another number of workers?")


def _load_slice_public(name: str, t: torch.Tensor, saved: torch.Tensor) -> None:
    """The public path of loading this rank's slice: every rank's slice gathered, the whole written through rank 0."""
    import torch.distributed as dist

    _, world = _rank_and_world()

    def whole(gathered: torch.Tensor) -> torch.Tensor:
        _check_slice_shape(name, (-(-gathered.numel() // world),), saved)
        slices = [torch.empty_like(saved) for _ in range(world)]
        if world > 1:
            dist.all_gather(slices, saved.contiguous())
        else:
            slices = [saved]
        return torch.cat(slices)[: gathered.numel()].reshape(gathered.shape)

    _write_whole(t, whole)


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
            elif compat_deepspeed.partition_layout_known():
                _copy_own_slice(name, t, state[name], rank)
            else:
                _write_whole(t, lambda gathered, name=name: _checked_full(name, state[name], tuple(gathered.shape)))
    return missing, unexpected


def _checked_full(name: str, value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(value.shape) != shape:
        raise ValueError(f"{name}: shape {tuple(value.shape)} does not fit {shape}")
    return value


def _copy_own_slice(name: str, t: torch.Tensor, value: torch.Tensor, rank: int) -> None:
    shape = compat_deepspeed.full_shape(t)
    _checked_full(name, value, shape)
    local = compat_deepspeed.local_partition(t)
    n = local.numel()
    piece = value.reshape(-1)[rank * n: (rank + 1) * n]
    local.zero_()
    local[: piece.numel()].copy_(piece)


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
