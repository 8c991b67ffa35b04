"""Resuming a checkpoint on another number of workers: DeepSpeed's per-rank optimizer shards and forgetless's ZeRO-3
partitions, cut again for the new count.

DeepSpeed saves ZeRO-1/2/3 optimizer state (bf16 ZeRO-1's bf16 optimizer too) one file per rank, each a flat slice
of the fp32 master weights and of every optimizer moment, and loads it only on the number of ranks that wrote it.
Here the N files of a checkpoint are read as one state that does not depend on N (`SavedOptimizer`: each trained
parameter's fp32 copy and moments by name, the step and hyperparameters of each parameter group, the loss scaler),
and each of M ranks cuts its own slices of it in the new engine's layout and loads them through the optimizer's own
`load_state_dict` (which reads only the rank's entry); the learning-rate scheduler and the engine's step counters
come from the checkpoint's model-states file. Files are memory-mapped and loaded weights-only
(checkpoints.safe_torch_load), so a rank touches the pages of its slices, not N files' worth of memory. ZeRO-0
saves one world-size-independent file (fp32, and bf16 on CPU), which DeepSpeed's own load takes on any count.

DeepSpeed's own route, universal checkpoints (`ds_to_universal`, then `checkpoint: {load_universal: true}`), works
on CPU too, but converts offline into a file per parameter and state on disk, reads every file with
`weights_only=False`, and has no ZeRO-0; this reads the checkpoint as it is. The file layout read here is DeepSpeed
0.19's (its seam: _compat/deepspeed.py); outside that range a resume on another count is refused, naming the count.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from forgetless._compat import deepspeed as compat_deepspeed
from forgetless.platform.worker import checkpoints

# one per rank (`bf16_`: DeepSpeed's bf16 optimizer, which bf16 ZeRO-1 uses)
SHARD_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
MODEL_STATES_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
FP32 = "fp32"  # the key of the fp32 master copy beside the optimizer's own state keys
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")
OPTIMIZER_SCALARS = ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad")


class ReshardRefused(RuntimeError):
    """The checkpoint cannot be cut for this worker count (a layout forgetless does not re-shard)."""


def shard_files(ds_dir: str | Path) -> list[Path]:
    """The per-rank optimizer files of a DeepSpeed checkpoint folder, in rank order ([] for ZeRO-0 with fp32)."""
    found = {int(m.group(1)): p for p in Path(ds_dir).iterdir() if (m := SHARD_FILE.match(p.name))} \
        if Path(ds_dir).is_dir() else {}
    if sorted(found) != list(range(len(found))):
        raise ReshardRefused(f"{ds_dir}: optimizer shards of ranks {sorted(found)}: some are missing")
    return [found[r] for r in range(len(found))]


def written_world_size(ds_dir: str | Path) -> int | None:
    """How many ranks wrote the optimizer state in `ds_dir`; None where it does not depend on it (ZeRO-0, fp32)."""
    return len(shard_files(ds_dir)) or None


class Pieces:
    """A flat tensor kept as the consecutive pieces it was saved in (one per rank), read by range without joining."""

    def __init__(self) -> None:
        self.pieces: list[torch.Tensor] = []
        self.starts: list[int] = []
        self.numel = 0

    def add(self, t: torch.Tensor) -> None:
        self.starts.append(self.numel)
        self.pieces.append(t.reshape(-1))
        self.numel += t.numel()

    def take(self, a: int, b: int, end: int | None = None) -> torch.Tensor:
        """Elements [a, b) as a new tensor; zeros from `end` (default: the last piece's end) on."""
        end = self.numel if end is None else min(end, self.numel)
        out = torch.zeros(b - a, dtype=self.pieces[0].dtype)
        for s, t in zip(self.starts, self.pieces):
            lo, hi = max(a, s), min(b, end, s + t.numel())
            if lo < hi:
                out[lo - a: hi - a] = t[lo - s: hi - s]
        return out


@dataclass
class SavedOptimizer:
    """A DeepSpeed checkpoint's optimizer state without its world size: per trained parameter (by name) its fp32
    master copy and moments, each readable by element range; per parameter group its non-sliced state (the step)
    and hyperparameters; the optimizer's scalars (loss scaler, clipping); the engine's scheduler and counters."""

    world: int
    numel: dict[str, int] = field(default_factory=dict)
    group_of: dict[str, int] = field(default_factory=dict)
    values: dict[tuple[str, str], tuple[Pieces, int]] = field(default_factory=dict)  # (name, key) -> where
    group_state: dict[int, dict[str, Any]] = field(default_factory=dict)  # step and other per-group scalars
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    scalars: dict[str, Any] = field(default_factory=dict)
    engine_state: dict[str, Any] = field(default_factory=dict)

    def take(self, name: str, key: str, a: int, b: int) -> torch.Tensor:
        """Elements [a, b) of parameter `name`'s flattened `key` (FP32 or an optimizer state key), zero past its
        end (ZeRO's padding)."""
        if (name, key) not in self.values:
            raise ReshardRefused(f"the checkpoint has no {key} for parameter {name}")
        pieces, offset = self.values[name, key]
        return pieces.take(offset + a, offset + b, end=offset + self.numel[name])

    def keys(self, group: int) -> list[str]:
        """The optimizer state keys sliced like the weights (exp_avg, exp_avg_sq, ...) of parameter group `group`."""
        return sorted({k for (n, k) in self.values if self.group_of[n] == group and k != FP32})

    def full(self, name: str, key: str) -> torch.Tensor:
        return self.take(name, key, 0, self.numel[name])


def _load(path: Path) -> Any:
    return checkpoints.safe_torch_load(path, map_location="cpu", mmap=True)


def read_saved_optimizer(ds_dir: str | Path) -> SavedOptimizer:
    """The optimizer state of the DeepSpeed checkpoint folder `ds_dir` (ZeRO-1/2/3, bf16 optimizer), whatever the
    number of ranks that wrote it."""
    files = shard_files(ds_dir)
    if not files:
        raise ReshardRefused(f"{ds_dir} has no per-rank optimizer shards (ZeRO-0: any worker count loads it)")
    model_states = next((Path(ds_dir, f) for f in MODEL_STATES_FILES if Path(ds_dir, f).is_file()), None)
    if model_states is None:
        raise ReshardRefused(f"{ds_dir} has no model-states file ({' or '.join(MODEL_STATES_FILES)})")
    states = _load(model_states)
    saved = SavedOptimizer(world=len(files), engine_state={k: states.get(k) for k in ("lr_scheduler",
                                                                                         *ENGINE_COUNTERS)})
    shards = [_load(f)["optimizer_state_dict"] for f in files]
    shapes = states["param_shapes"]
    if "fp32_flat_groups" in shards[0]:
        _read_per_parameter_slices(saved, shards, shapes)
    else:
        _read_flat_group_slices(saved, shards, shapes)
    return saved


def _base_state(shard: dict[str, Any]) -> dict[str, Any]:
    return shard["optimizer_state_dict"] if "fp32_flat_groups" in shard else shard["base_optimizer_state"]


def _group_of_index(base: dict[str, Any]) -> dict[int, int]:
    """The parameter group of each flat tensor the base optimizer steps (its state_dict's parameter indices)."""
    return {i: g for g, group in enumerate(base["param_groups"]) for i in group["params"]}


def _read_common(saved: SavedOptimizer, shards: list[dict[str, Any]], sizes: list[int]) -> dict[int, list[str]]:
    """Scalars, hyperparameters and per-group state from rank 0; returns the state keys sliced like the weights
    (tensors of rank 0's partition size, `sizes[i]` for flat tensor i) of each flat tensor."""
    first = shards[0]
    base = _base_state(first)
    saved.scalars = {k: first[k] for k in OPTIMIZER_SCALARS if k in first}
    saved.param_groups = [{k: v for k, v in g.items() if k != "params"} for g in base["param_groups"]]
    sliced: dict[int, list[str]] = {}
    for i, g in _group_of_index(base).items():
        state = base["state"].get(i, {})
        sliced[i] = [k for k, v in state.items() if torch.is_tensor(v) and v.dim() == 1 and v.numel() == sizes[i]]
        saved.group_state.setdefault(g, {k: v for k, v in state.items() if k not in sliced[i]})
    return sliced


def flat_partition_size(numel: int, world: int) -> int:
    """ZeRO-1/2's partition size of a group of `numel` elements: the group is padded to a multiple of 2 * world
    (DeepSpeed's nccl_start_alignment_factor) and cut into `world` equal partitions."""
    align = 2 * world
    return -(-numel // align) * align // world


def _read_flat_group_slices(saved: SavedOptimizer, shards: list[dict[str, Any]],
                            shapes: list[dict[str, Any]]) -> None:
    """ZeRO-1/2 (and DeepSpeed's bf16 optimizer): each group's parameters flattened one after another, padded at the
    end, and cut into N equal partitions; rank r saved partition r (its fp32 copy with the padding stripped, or not)."""
    if any(any(any(p) for p in s.get("param_alignment_paddings", [])) for s in shards):
        raise ReshardRefused("the checkpoint pads between parameters (zero_optimization.parameter_alignment)")
    world = len(shards)
    numels = [sum(math.prod(shape) for shape in group.values()) for group in shapes]
    sizes = [flat_partition_size(n, world) for n in numels]
    sliced = _read_common(saved, shards, sizes)
    group_of = _group_of_index(_base_state(shards[0]))
    for i, keys in sliced.items():
        whole: dict[str, Pieces] = {key: Pieces() for key in (FP32, *keys)}
        for r, shard in enumerate(shards):
            real = min(max(numels[i] - r * sizes[i], 0), sizes[i])
            fp32 = shard["single_partition_of_fp32_groups"][i]
            if fp32.numel() not in (real, sizes[i]):
                raise ReshardRefused(f"rank {r}'s partition {i} has {fp32.numel()} elements; the layout forgetless "
                                     f"knows gives {sizes[i]} ({real} without padding)")
            state = _base_state(shard)["state"][i]
            for key in whole:
                whole[key].add((fp32 if key == FP32 else state[key])[:real])
        offset = 0
        for name, shape in shapes[i].items():
            saved.numel[name], saved.group_of[name] = math.prod(shape), group_of[i]
            for key, pieces in whole.items():
                saved.values[name, key] = (pieces, offset)
            offset += saved.numel[name]


def _read_per_parameter_slices(saved: SavedOptimizer, shards: list[dict[str, Any]],
                               shapes: list[dict[str, Any]]) -> None:
    """ZeRO-3: every parameter cut into N equal slices (the last zero-padded); rank r's flat tensor of a sub-group
    holds slice r of each of its parameters, one after another."""
    flats = [s["fp32_flat_groups"] for s in shards]
    sliced = _read_common(saved, shards, [f.numel() for f in flats[0]])
    group_of = _group_of_index(_base_state(shards[0]))
    for i, keys in sliced.items():
        offset = 0
        for name, shape in shapes[i].items():
            numel = math.prod(shape)
            n = -(-numel // saved.world)
            saved.numel[name], saved.group_of[name] = numel, group_of[i]
            for key in (FP32, *keys):
                pieces = Pieces()
                for shard, flat in zip(shards, flats):
                    pieces.add((flat[i] if key == FP32 else shard["optimizer_state_dict"]["state"][i][key])
                               [offset: offset + n])
                saved.values[name, key] = (pieces, 0)
            offset += n


# -- loading into an engine of another world size ------------------------------------------------------------------


def load_resharded(engine: Any, ds_dir: str | Path, rank: int, world: int) -> SavedOptimizer:
    """Load the optimizer state, scheduler and step counters of the DeepSpeed checkpoint `ds_dir` (written by any
    number of ranks) into `engine`, this rank's slices in this world's layout. Every rank calls it; nothing is
    exchanged between ranks. The module's weights are loaded already (model.pt, or the re-cut partitions)."""
    if not compat_deepspeed.reshard_supported():
        raise ReshardRefused("forgetless re-shards only DeepSpeed 0.19's checkpoint layout (its seam is off)")
    saved = read_saved_optimizer(ds_dir)
    target = engine.optimizer.state_dict()  # this rank's entry in the new layout, to fill in
    layout = compat_deepspeed.zero_param_shapes(engine)
    if "fp32_flat_groups" in target:
        flats_key, base = "fp32_flat_groups", target["optimizer_state_dict"]
        sizes = [f.numel() for f in target[flats_key]]
        cut = _per_parameter_cutter(layout, rank, world)
    else:
        flats_key, base = "single_partition_of_fp32_groups", target["base_optimizer_state"]
        if any(any(p) for p in target.get("param_alignment_paddings", [])):
            raise ReshardRefused("the engine pads between parameters (zero_optimization.parameter_alignment)")
        sizes = [flat_partition_size(sum(math.prod(s) for s in group.values()), world) for group in layout]
        cut = _flat_group_cutter(layout, rank)
    group_of = _group_of_index(base)
    base["state"], flats = {}, []  # (a new list: the entry may be the engine's own list of its tensors)
    for i, flat in enumerate(target[flats_key]):
        g = group_of[i]
        if flat.numel() > sizes[i]:
            raise ReshardRefused(f"the engine's flat tensor {i} has {flat.numel()} elements; the layout forgetless "
                                 f"knows gives {sizes[i]}")
        base["state"][i] = {**saved.group_state.get(g, {}),
                            **{key: cut(saved, i, key, sizes[i]) for key in saved.keys(g)}}
        # (ZeRO-1/2 hand out their fp32 copy without the end's padding; the load pads it again)
        flats.append(cut(saved, i, FP32, sizes[i])[: flat.numel()].to(flat.dtype))
    target[flats_key] = flats
    for g, group in enumerate(base["param_groups"]):
        group.update(saved.param_groups[g])
    target.update(saved.scalars)
    entries: list[Any] = [None] * world
    entries[rank] = target
    engine.optimizer.load_state_dict(state_dict_list=entries, load_optimizer_states=True, load_from_fp32_weights=True)
    _load_engine_state(engine, saved.engine_state)
    return saved


def _flat_group_cutter(layout: list[dict[str, Any]], rank: int):
    """ZeRO-1/2's layout: group i's parameters one after another; this rank's partition is elements
    [rank * P, (rank + 1) * P) of that (P: the engine's partition size)."""

    def cut(saved: SavedOptimizer, i: int, key: str, size: int) -> torch.Tensor:
        out = torch.zeros(size)
        lo, offset = rank * size, 0
        for name, shape in layout[i].items():
            numel = math.prod(shape)
            a, b = max(lo, offset), min(lo + size, offset + numel)
            if a < b:
                out[a - lo: b - lo] = saved.take(name, key, a - offset, b - offset)
            offset += numel
        return out

    return cut


def _per_parameter_cutter(layout: list[dict[str, Any]], rank: int, world: int):
    """ZeRO-3's layout: sub-group i's flat tensor holds this rank's slice of each of its parameters in turn."""

    def cut(saved: SavedOptimizer, i: int, key: str, size: int) -> torch.Tensor:
        parts = []
        for name, shape in layout[i].items():
            n = -(-math.prod(shape) // world)
            parts.append(saved.take(name, key, rank * n, (rank + 1) * n))
        out = torch.cat(parts) if parts else torch.zeros(0)
        if out.numel() != size:
            raise ReshardRefused(f"ZeRO-3 sub-group {i}: the slices add up to {out.numel()} elements, the engine "
                                 f"has {size}")
        return out

    return cut


def _load_engine_state(engine: Any, state: dict[str, Any]) -> None:
    """The learning-rate scheduler and step counters (what DeepSpeed's own load restores besides weights and
    optimizer)."""
    if engine.lr_scheduler is not None and state.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    for name in ENGINE_COUNTERS:
        if state.get(name) is not None:
            setattr(engine, name, state[name])


# -- ZeRO-3 partitions of the weights --------------------------------------------------------------------------------


def resharded_partition_state(module: nn.Module, files: list[Path], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's partition state (zero3_partitions.partition_state's format) for `world` ranks, cut from the
    partition files written by another number of ranks (`files[r]`: rank r's). Each parameter's slices are read from
    the memory-mapped files; no rank assembles a whole parameter."""
    if not compat_deepspeed.reshard_supported():
        raise ReshardRefused("forgetless re-shards only DeepSpeed 0.19's partition layout (its seam is off)")
    saved = [checkpoints.safe_torch_load(f, map_location="cpu", mmap=True, deepspeed_types=False) for f in files]
    out: dict[str, torch.Tensor] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if name not in saved[0]:
            raise ReshardRefused(f"the partition files lack {name}")
        if not compat_deepspeed.is_partitioned(t):
            out[name] = saved[0][name]
            continue
        pieces = Pieces()
        for part in saved:
            pieces.add(part[name])
        numel = math.prod(compat_deepspeed.full_shape(t))
        n = -(-numel // world)
        out[name] = pieces.take(rank * n, (rank + 1) * n, end=numel).to(saved[0][name].dtype)
    return out
