"""The CLI stopped with SIGTERM (what `ray job stop` sends; Ctrl-C takes the same path) once Ray Train had committed
its 3rd transfer checkpoint, before it finished, then run again: as it was, with the latest checkpoint truncated, and
with a DeepSpeed shard of it replaced by a pickle that would run code.

The interrupted run (a CLI run with its own cluster and pre-training) is made once for the module; each test restores
it (`InterruptedRun.restore`) before resuming or damaging it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY
from forgetless.platform.worker import checkpoints

from .cli_runs import epoch_of, final_state, interrupted_run, output, run_cli, run_dir

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def interrupted_cli_run(tmp_path_factory):
    """`forgetless run` of conftest's TINY with 12 epochs, stopped once its 3rd transfer epoch was committed."""
    cfg = {**TINY, "train": {"epochs": 12, "lr": 0.01, "batch_size": 16}}
    return interrupted_run(cfg, tmp_path_factory.mktemp("interrupted") / "run")


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{Path('mlflow.db').resolve()}")


def test_interrupted_run_resumes_from_its_checkpoint(interrupted_cli_run, monkeypatch):
    """Its MLflow parent run is marked KILLED, and re-running the same command resumes from the newest checkpoint it
    completed, under the same parent run (reopened: one parent per experiment, two invocations on it)."""
    run_folder = run_dir(interrupted_cli_run.restore())
    monkeypatch.chdir(interrupted_cli_run.folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cmd = [sys.executable, "-m", "forgetless.cli", "run", "c.yaml"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    assert not (run_folder / "final").exists(), "the first invocation finished before it was interrupted"

    second = subprocess.run(cmd + ["--json"], capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from checkpoint" in second.stderr
    # --json: stdout is the JSON and nothing else (the workers' progress lines and Ray's go to stderr)
    (printed,) = json.loads(second.stdout)
    assert printed["label"] == "finetune" and len(printed["R"]) == 2
    state = json.loads((run_folder / "final" / "state.json").read_text())
    resumed = state["resumed_from"]
    # the resume point is the newest checkpoint completed before the abort: the committed one or a later one
    assert resumed["stage"] == 1 and resumed["epoch"] == epoch_of(interrupted_cli_run.newest)
    assert resumed["epoch"] >= interrupted_cli_run.committed - 1  # at most the one awaiting its manifest is redone
    # every epoch is in the history exactly once up to the resume point, and training went on to the end
    assert state["epoch"] == 12 and state["finished"]
    # one MLflow child run for the strategy across both invocations (resumed, not duplicated)
    c = _client()
    exp = c.get_experiment_by_name("forgetless")
    finetune_runs = c.search_runs([exp.experiment_id], "tags.strategy = 'finetune'")
    assert len(finetune_runs) == 1 and finetune_runs[0].info.status == "FINISHED"
    # each metric (system/... samples included) has each step once across both invocations
    for key in finetune_runs[0].data.metrics:
        steps = [m.step for m in c.get_metric_history(finetune_runs[0].info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, sorted(steps))
    parents = c.search_runs([exp.experiment_id], "tags.`forgetless.command` = 'run'", order_by=["start_time ASC"])
    # one parent for the experiment: the interrupted invocation's (KILLED), reopened and finished by the second
    assert [r.info.status for r in parents] == ["FINISHED"]
    assert parents[0].data.tags["forgetless.invocations"] == "2"
    assert [h["status"] for h in json.loads(parents[0].data.tags["forgetless.invocation_history"])] == [
        "KILLED", "FINISHED"]


def test_truncated_checkpoint_is_skipped_and_the_previous_one_resumed(interrupted_cli_run):
    cfg, newest, previous = interrupted_cli_run.cfg, interrupted_cli_run.newest, interrupted_cli_run.previous
    workdir = interrupted_cli_run.restore()
    shard = run_dir(workdir) / newest / "model.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])

    assert run_cli(cfg, workdir) == 0, output(workdir)[-3000:]
    # the re-run's output; its worker's stdout (progress) and stderr (warnings) reach the log through different
    # streams, so their order is not fixed: look at the whole re-run
    rerun = output(workdir).rsplit("starting Ray", 1)[-1]
    # one warning names the truncated checkpoint and the file (a newer one left without a manifest by the interrupt
    # would get its own); none names the checkpoint resumed
    warnings = [line for line in rerun.splitlines() if "warning: checkpoint" in line]
    named = [line for line in warnings if f"/{newest} " in line]
    assert len(named) == 1 and "model.pt has" in named[0], warnings
    assert not any(f"/{previous} " in line for line in warnings), warnings
    assert f"resuming from checkpoint {previous}" in output(workdir)
    state = final_state(workdir)
    assert state["finished"] and state["epoch"] == 12 and state["resumed_from"]["epoch"] == epoch_of(previous)
    # the damaged checkpoint's folder is not written again while Ray Train lists it (see checkpoint_io.save_checkpoint)
    assert f"not writing checkpoint {newest}" in output(workdir)


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
