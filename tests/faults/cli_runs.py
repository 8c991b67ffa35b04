"""Helpers of the fault tests that drive the real `forgetless` CLI (its own embedded Ray cluster, real DeepSpeed
workers): start it in a folder, wait for Ray Train to commit checkpoints, find its Ray Train workers, read a run's
checkpoint folders; and one interrupted run that several tests restore and damage instead of each making its own."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

EPOCH_CHECKPOINT = re.compile(r"checkpoint_s1_p0_e(\d{4})")


def start_cli(cfg: dict, folder: Path, command: str = "run") -> subprocess.Popen:
    """`forgetless COMMAND c.yaml` in `folder` (its own ./forgetless_runs and ./mlflow.db); output in folder/cli.log."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(folder / "cli.log", "ab") as log:  # the child keeps its own handle
        return subprocess.Popen([sys.executable, "-m", "forgetless.cli", command, "c.yaml"], cwd=folder, env=env,
                                stdout=log, stderr=subprocess.STDOUT)


def run_cli(cfg: dict, folder: Path, timeout_s: float = 900) -> int:
    proc = start_cli(cfg, folder)
    return proc.wait(timeout=timeout_s)


def output(folder: Path) -> str:
    return (folder / "cli.log").read_text(errors="replace")


def run_dir(folder: Path, label: str = "finetune") -> Path | None:
    """The folder of the transfer run of strategy `label` of conftest's TINY config (named `tiny`)."""
    found = sorted(folder.glob(f"forgetless_runs/tiny-{label}-*"))
    return found[0] if found else None


def committed_names(folder: Path, label: str = "finetune") -> list[str]:
    """The checkpoints Ray Train has committed and still keeps, oldest first (from its run snapshot)."""
    rd = run_dir(folder, label)
    snapshot = rd / "checkpoint_manager_snapshot.json" if rd else None
    if snapshot is None or not snapshot.exists():
        return []
    try:
        data = json.loads(snapshot.read_text())
    except ValueError:  # caught while being rewritten
        return []
    return [r["checkpoint_dir_name"] for r in data.get("checkpoint_results", [])]


def epoch_of(name: str) -> int | None:
    m = EPOCH_CHECKPOINT.fullmatch(name)
    return int(m.group(1)) if m else None


def wait_for_committed_epoch(proc: subprocess.Popen, folder: Path, epoch: int, timeout_s: float = 600,
                             label: str = "finetune") -> int:
    """Wait (bounded) until Ray Train has committed the transfer checkpoint of `epoch` or a later one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        epochs = [e for e in map(epoch_of, committed_names(folder, label)) if e is not None]
        if epochs and max(epochs) >= epoch:
            return max(epochs)
        assert proc.poll() is None, f"the CLI exited ({proc.returncode}) before epoch {epoch} was committed:\n" \
                                    f"{output(folder)[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no transfer checkpoint of epoch >= {epoch} was committed within {timeout_s:.0f} s")


def epochs_on_disk(folder: Path, with_manifest: bool, label: str = "finetune") -> list[int]:
    """Epochs whose checkpoint folder exists (with a manifest, if asked), in order."""
    rd = run_dir(folder, label)
    if rd is None:
        return []
    found = [(epoch_of(p.name), p) for p in rd.iterdir() if p.is_dir()]
    return sorted(e for e, p in found if e is not None and (not with_manifest or (p / "manifest.json").exists()))


def train_workers(pid: int) -> list[psutil.Process]:
    """The Ray Train worker processes started by the CLI `pid` (its embedded cluster's processes descend from it)."""
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def interrupt(proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """SIGTERM (what `ray job stop` sends): Ray Train aborts the run, its committed checkpoints kept."""
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=timeout_s)


def final_state(folder: Path, label: str = "finetune") -> dict:
    return json.loads((run_dir(folder, label) / "final" / "state.json").read_text())


def last_manifested(folder: Path) -> list[str]:
    """Committed checkpoints that carry a manifest, newest first."""
    rd = run_dir(folder)
    return [n for n in reversed(committed_names(folder)) if (rd / n / "manifest.json").exists()]


@dataclass
class InterruptedRun:
    """`forgetless run` of `cfg` in `folder`, stopped by SIGTERM once Ray Train had committed a transfer checkpoint,
    before it finished; a copy of the folder as it was then is kept in `pristine`."""

    cfg: dict
    folder: Path
    pristine: Path
    committed: int  # the newest transfer epoch Ray Train had committed when the CLI was stopped
    newest: str  # the newest and the previous committed checkpoints that carry a manifest
    previous: str

    def restore(self) -> Path:
        """Put the folder back as it was at the interrupt, at the same path: the run's files (Ray Train's snapshot,
        the MLflow store, the checkpoints' manifests) name their absolute paths."""
        shutil.rmtree(self.folder, ignore_errors=True)
        shutil.copytree(self.pristine, self.folder, symlinks=True)
        return self.folder


def interrupted_run(cfg: dict, folder: Path, epoch: int = 3) -> InterruptedRun:
    """`forgetless run` stopped (SIGTERM) once Ray Train has committed the checkpoint of `epoch`, before it finished;
    the folder is copied beside itself (`<folder>.pristine`) for `InterruptedRun.restore`."""
    proc = start_cli(cfg, folder)
    committed = wait_for_committed_epoch(proc, folder, epoch)
    interrupt(proc)
    assert not (run_dir(folder) / "final").exists(), "the run finished before it was interrupted"
    newest, previous = last_manifested(folder)[:2]
    pristine = folder.with_name(folder.name + ".pristine")
    shutil.copytree(folder, pristine, symlinks=True)
    return InterruptedRun(cfg, folder, pristine, committed, newest, previous)
