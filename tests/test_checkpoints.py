"""Checkpoint manifests and safe loading, on real files (no Ray): a damaged file is named, a pickle that would run
code is refused without running, and DeepSpeed's own ZeRO shards load weights-only through the wrapped engine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from forgetless.platform.worker import checkpoints


class WritesMarker:
    """Unpickling it would write a file: stands in for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the pickle ran"))


def _checkpoint(folder: Path) -> Path:
    (folder / "ds").mkdir(parents=True)
    torch.save({"w": torch.arange(6.0)}, folder / "model.pt")
    torch.save({"optimizer_state_dict": {"step": torch.tensor(3)}}, folder / "ds" / "shard.pt")
    (folder / "state.json").write_text(json.dumps({"epoch": 2}))
    (folder / checkpoints.MANIFEST_FILE).write_bytes(checkpoints.manifest_bytes(checkpoints.describe_files(folder)))
    return folder


def test_an_intact_checkpoint_verifies(tmp_path):
    assert checkpoints.verify_folder(_checkpoint(tmp_path / "c")) is None


def test_a_truncated_file_is_named(tmp_path):
    folder = _checkpoint(tmp_path / "c")
    data = (folder / "ds" / "shard.pt").read_bytes()
    (folder / "ds" / "shard.pt").write_bytes(data[: len(data) // 2])
    problem = checkpoints.verify_folder(folder)
    assert problem is not None and "ds/shard.pt" in problem and "bytes" in problem


def test_a_changed_file_of_the_same_size_fails_its_sha256(tmp_path):
    folder = _checkpoint(tmp_path / "c")
    (folder / "state.json").write_text(json.dumps({"epoch": 9}))
    assert "state.json does not match its sha256" in checkpoints.verify_folder(folder)


def test_missing_manifest_or_file(tmp_path):
    folder = _checkpoint(tmp_path / "c")
    (folder / "model.pt").unlink()
    assert checkpoints.verify_folder(folder) == "model.pt is missing"
    (folder / checkpoints.MANIFEST_FILE).unlink()
    assert "no manifest.json" in checkpoints.verify_folder(folder)


def test_a_pickle_that_runs_code_is_refused_even_with_a_matching_manifest(tmp_path):
    folder = _checkpoint(tmp_path / "c")
    marker = tmp_path / "marker"
    torch.save(WritesMarker(marker), folder / "ds" / "shard.pt")
    # whoever can write the checkpoint can rewrite its manifest too: the manifest is not what stops the pickle
    (folder / checkpoints.MANIFEST_FILE).write_bytes(checkpoints.manifest_bytes(checkpoints.describe_files(folder)))
    problem = checkpoints.verify_folder(folder)
    assert problem is not None and "shard.pt was refused" in problem
    with pytest.raises(checkpoints.CheckpointRefused, match="shard.pt"):
        checkpoints.safe_torch_load(folder / "ds" / "shard.pt")
    assert not marker.exists()
    # the planted file is a working exploit: loaded the way DeepSpeed's own engine loads, it runs
    torch.load(folder / "ds" / "shard.pt", weights_only=False)
    assert marker.read_text() == "the pickle ran"


def test_fetch_verified_names_an_unreadable_checkpoint(tmp_path):
    assert "cannot be read" in checkpoints.fetch_verified(str(tmp_path / "nowhere"), tmp_path / "copy")


DEEPSPEED_ROUND_TRIP = textwrap.dedent("""
    import os, sys, tempfile
    import torch, deepspeed
    from forgetless.platform.worker import checkpoints
    deepspeed.init_distributed(dist_backend="gloo")
    def engine(stage):
        cfg = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2, "zero_optimization": {"stage": stage},
               "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        return deepspeed.initialize(model=m, optimizer=opt, config=cfg, dist_init_required=False)[0]
    for stage in (0, 1, 2, 3):
        first = engine(stage)
        loss = first(torch.ones(2, 4)).sum(); first.backward(loss); first.step()
        d = tempfile.mkdtemp()
        first.save_checkpoint(d, tag="ds")
        second = engine(stage)
        checkpoints.install_weights_only_loader(second)
        second.load_checkpoint(d, tag="ds")
        a, b = first.optimizer.state_dict(), second.optimizer.state_dict()
        print("LOADED", stage, str(a) == str(b), checkpoints.verify_folder(d))
""")


def test_deepspeed_shards_load_weights_only(tmp_path):
    """DeepSpeed's real ZeRO-0..3 shards (optimizer state included) load through the weights-only engine: the
    allow-list holds every type DeepSpeed stores. (A process of its own: DeepSpeed needs a process group.)"""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0",
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    script = tmp_path / "round_trip.py"
    script.write_text(DEEPSPEED_ROUND_TRIP)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in (0, 1, 2, 3):
        # the same optimizer state back; a bare DeepSpeed folder has no manifest, and verify_folder says only that
        assert f"LOADED {stage} True no manifest.json" in out.stdout, out.stdout[-2000:]
