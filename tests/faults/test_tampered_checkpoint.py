"""A DeepSpeed shard of the latest checkpoint replaced by a pickle that would run code (its manifest rewritten to
match, as anyone who can write the storage could): the re-run refuses the file, skips the checkpoint with a warning
naming it, resumes from the previous one, and the pickle never runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from forgetless.platform import checkpoints

from .cli_runs import epoch_of, final_state, output, run_cli, run_dir

pytestmark = pytest.mark.e2e


class WritesMarker:
    """Unpickling it writes a file: stands in for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the pickle ran"))


def plant(checkpoint: Path, marker: Path) -> Path:
    """Replace the first DeepSpeed shard with the pickle and rewrite the manifest so that it verifies."""
    shard = sorted((checkpoint / "ds").rglob("*.pt"))[0]
    torch.save(WritesMarker(marker), shard)
    manifest = json.loads((checkpoint / checkpoints.MANIFEST_FILE).read_text())
    manifest["files"][str(shard.relative_to(checkpoint))] = checkpoints.file_digest(shard)
    (checkpoint / checkpoints.MANIFEST_FILE).write_text(json.dumps(manifest))
    return shard


def test_tampered_deepspeed_shard_never_runs(interrupted_cli_run):
    cfg, newest, previous = interrupted_cli_run.cfg, interrupted_cli_run.newest, interrupted_cli_run.previous
    workdir = interrupted_cli_run.restore()
    marker = workdir / "the-pickle-ran"
    shard = plant(run_dir(workdir) / newest, marker)
    # the planted file is a working exploit: loaded as DeepSpeed's own checkpoint engine loads (weights_only=False)
    proof = workdir / "proof"
    torch.save(WritesMarker(proof), workdir / "proof.pt")
    torch.load(workdir / "proof.pt", weights_only=False)
    assert proof.exists()

    assert run_cli(cfg, workdir) == 0, output(workdir)[-3000:]
    assert not marker.exists()
    warnings = [line for line in output(workdir).splitlines() if f"/{newest} " in line and "warning" in line]
    assert len(warnings) == 1 and f"{shard.name} was refused" in warnings[0], warnings
    assert f"resuming from checkpoint {previous}" in output(workdir)
    assert final_state(workdir)["resumed_from"]["epoch"] == epoch_of(previous)
