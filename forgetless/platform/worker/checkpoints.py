"""Checkpoint integrity and safe loading: manifests, verification, and a DeepSpeed checkpoint engine that loads with
`weights_only=True`.

Every checkpoint folder carries `manifest.json` (size and sha256 of each of its files), written by world rank 0 once
Ray Train has committed the checkpoint, so after every rank's upload: a folder with a manifest that verifies is
complete and unchanged. Restore verifies a local copy before anything is loaded from it, and every `.pt` file in it is
opened with `weights_only=True` and an allow-list of the few types DeepSpeed stores: a file that holds anything else
(a pickle that would run code) is refused, never executed.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import time
import zipfile
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConsistencyMode

from forgetless import storage

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
# How long world rank 0 waits for Ray Train's controller to commit a reported checkpoint (it polls the workers every
# 2 s; a slow upload by another rank to S3 also counts here). Past it the checkpoint gets no manifest and is not a
# resume point.
COMMIT_TIMEOUT_S = 600.0
_HASH_CHUNK = 1 << 20


class CheckpointRefused(Exception):
    """A checkpoint file holds Python objects other than tensors and the allow-listed DeepSpeed types."""


# -- manifests ------------------------------------------------------------------------------------------------------


def file_digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            sha.update(chunk)
    return {"size": path.stat().st_size, "sha256": sha.hexdigest()}


def describe_files(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under `folder`, by relative path (this rank's part of a checkpoint)."""
    root = Path(folder)
    return {str(p.relative_to(root)): file_digest(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root) != Path(MANIFEST_FILE)}


def gather_files(files: dict[str, dict[str, Any]], world: int) -> dict[str, dict[str, Any]]:
    """Every rank's file descriptions, merged (a collective: every rank calls it)."""
    if world == 1:
        return dict(files)
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, files)
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        merged.update(part)
    return merged


def manifest_bytes(files: dict[str, dict[str, Any]]) -> bytes:
    return json.dumps({"version": MANIFEST_VERSION, "written_at": time.time(), "files": files}, indent=1).encode()


def wait_until_committed(name: str, timeout_s: float = COMMIT_TIMEOUT_S) -> bool:
    """Block until Ray Train's controller has committed this worker's latest report; True if the checkpoint named
    `name` is then among the committed ones (a report Ray skipped after a worker failure is not)."""
    reported = ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED,
                                                      timeout_s=timeout_s)
    return any(Path(r.checkpoint.path).name == name for r in reported)


def committed_checkpoint_names() -> list[str]:
    """The folder names of the run's committed checkpoints that Ray Train still keeps, newest first."""
    reported = ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED,
                                                      timeout_s=COMMIT_TIMEOUT_S)
    names: list[str] = []
    for r in reversed(reported):
        name = Path(r.checkpoint.path).name
        if name not in names:  # a checkpoint re-written after a fall-back keeps its folder name
            names.append(name)
    return names


# -- verification ---------------------------------------------------------------------------------------------------


def verify_folder(folder: str | Path) -> str | None:
    """Why the checkpoint in (a local copy) `folder` must not be used, or None if it is intact and safe to load."""
    root = Path(folder)
    manifest = root / MANIFEST_FILE
    if not manifest.is_file():
        return f"no {MANIFEST_FILE} (the checkpoint was never completed)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST_FILE} is not a valid manifest"
    for rel, expected in files.items():
        path = root / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{rel} has {path.stat().st_size} bytes, the manifest says {expected['size']}"
        if file_digest(path)["sha256"] != expected["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    for rel in sorted(files):
        if rel.endswith(".pt"):
            try:
                # DeepSpeed writes its shards into a tag folder; the platform's own files sit at the top.
                probe_torch_file(root / rel, deepspeed_types="/" in rel)
            except CheckpointRefused as e:
                return str(e)
    return None


def probe_torch_file(path: Path, deepspeed_types: bool) -> None:
    """Open a torch file the way restore will (weights_only, allow-listed types) without keeping it: raise
    CheckpointRefused if it holds anything else. Memory-mapped where possible, so the tensors are not read."""
    safe_torch_load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), deepspeed_types=deepspeed_types)


def safe_torch_load(path: str | Path, map_location: Any = None, mmap: bool = False,
                    deepspeed_types: bool = True) -> Any:
    """torch.load with weights_only=True (and, for DeepSpeed's shards, its few checkpoint types allowed); a file that
    holds anything else is refused with CheckpointRefused."""
    allowed = deepspeed_safe_globals() if deepspeed_types else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        # torch's message names the unsupported global on one of its lines; its advice to allow-list it is not for
        # this case, so only that line (or the first) is kept.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if "unsupported global" in line.lower()), lines[0])
        raise CheckpointRefused(f"{Path(path).name} was refused: it holds more than tensors and DeepSpeed's "
                                f"checkpoint types, so it was not loaded ({reason})") from None


def deepspeed_safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed writes into its checkpoint shards (found by saving ZeRO-0..3 checkpoints):
    plain data classes and enums whose construction runs no code of the file's choosing."""
    # deferred: DeepSpeed picks its accelerator when first imported
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine:
    """Wraps a DeepSpeed checkpoint engine so that its loads use `safe_torch_load`; everything else (saving,
    commit) is the wrapped engine's. DeepSpeed's own TorchCheckpointEngine loads with weights_only=False."""

    def __init__(self, inner: Any):
        self.inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location=map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def install_weights_only_loader(engine: Any) -> None:
    """Make every checkpoint load of this DeepSpeed engine weights-only (before `engine.load_checkpoint`)."""
    if not isinstance(engine.checkpoint_engine, WeightsOnlyCheckpointEngine):
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine.checkpoint_engine)


def fetch_verified(uri: str, local_dir: str | Path) -> str | None:
    """Copy the checkpoint folder `uri` to `local_dir` and verify the copy; returns why it is unusable, or None."""
    try:
        storage.download_dir(uri, local_dir)
    except (OSError, ValueError) as e:
        return f"cannot be read ({e})"
    return verify_folder(local_dir)
