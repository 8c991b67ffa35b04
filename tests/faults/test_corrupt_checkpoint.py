"""A truncated file in the latest checkpoint: the re-run warns once, naming that checkpoint, and resumes from the
previous intact one (no traceback, exit 0)."""
from __future__ import annotations

import pytest

from .cli_runs import epoch_of, final_state, output, run_cli, run_dir

pytestmark = pytest.mark.e2e


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
    # the damaged checkpoint's folder is not written again while Ray Train lists it (see train_loop.save_checkpoint)
    assert f"not writing checkpoint {newest}" in output(workdir)
