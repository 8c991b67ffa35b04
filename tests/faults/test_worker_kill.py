"""SIGKILL one Ray Train worker mid-run: the same CLI invocation recovers by itself (Ray Train restarts the worker
group, which resumes from the checkpoint written last), exits 0, and ends with the accuracy matrix and curves of an
uninterrupted run of the same config, having re-trained at most one epoch."""
from __future__ import annotations

import signal
import time

import pytest

from .cli_runs import (
    epochs_on_disk,
    final_state,
    output,
    run_cli,
    run_dir,
    start_cli,
    train_workers,
    wait_for_committed_epoch,
)

pytestmark = pytest.mark.e2e

EPOCHS = 6


def test_killed_worker_recovers_by_itself_with_the_same_accuracy_matrix(workdir, tiny_config):
    cfg = tiny_config(train={"epochs": EPOCHS, "lr": 0.01, "batch_size": 16})
    reference_dir, killed_dir = workdir / "reference", workdir / "killed"
    assert run_cli(cfg, reference_dir) == 0, output(reference_dir)[-3000:]
    reference = final_state(reference_dir)

    proc = start_cli(cfg, killed_dir)
    wait_for_committed_epoch(proc, killed_dir, 2)
    workers = train_workers(proc.pid)
    assert len(workers) == cfg["scaling"]["num_workers"], "the run's Ray Train workers were not found"
    written = epochs_on_disk(killed_dir, with_manifest=False)
    manifested = epochs_on_disk(killed_dir, with_manifest=True)
    assert not (run_dir(killed_dir) / "final").exists() and max(written) < EPOCHS, "the run ended before the kill"
    killed_at = time.monotonic()
    workers[-1].send_signal(signal.SIGKILL)
    recovered_after = _wait_for_resume(proc, killed_dir, killed_at)

    assert proc.wait(timeout=900) == 0, output(killed_dir)[-3000:]
    state = final_state(killed_dir)
    assert state["finished"] and state["epoch"] == EPOCHS
    assert state["R"] == reference["R"]
    assert [h["acc"] for h in state["history"]] == [h["acc"] for h in reference["history"]]
    # the resume point is the newest checkpoint with a manifest at the kill, so no finished epoch is re-trained;
    # if the kill came while the newest one waited for its commit, that one epoch is
    resumed = state["resumed_from"]
    assert resumed["stage"] == 1 and resumed["epoch"] >= max(manifested) and resumed["epoch"] >= max(written) - 1
    print(f"\nkilled during epoch {max(written) + 1} (epochs written {written}, with manifest {manifested}); "
          f"resumed from epoch {resumed['epoch']}; the resume began {recovered_after:.1f} s after the kill")


def _wait_for_resume(proc, folder, since: float, timeout_s: float = 600) -> float:
    """Wait (bounded) until the restarted worker group says it resumes; the seconds since the kill."""
    deadline = since + timeout_s
    while time.monotonic() < deadline:
        if "resuming from checkpoint" in output(folder):
            return time.monotonic() - since
        assert proc.poll() is None, f"the CLI exited ({proc.returncode}) without resuming:\n{output(folder)[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"the run did not resume within {timeout_s:.0f} s of the worker's kill")
