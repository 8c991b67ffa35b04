"""The driver's progress view: the record a run's rank 0 writes, its one-line rendering, and the board reading
progress.json files from run folders (the end-to-end path, workers writing them, runs in every e2e test; the demo's
console in the README shows it)."""
import io
import time

import pytest

from forgetless.platform.driver import progress_board as progress
from forgetless.platform.worker import progress_file


def test_done_fraction_counts_stages_and_phases_equally():
    # stage 2 of stages [1, 2], phase 1 of 2, epoch 2 of 4: (1 + (1 + 0.5) / 2) / 2
    r = progress_file.progress_record("ft", 2, [1, 2], "all", 1, 2, 2, 4, 40, 0.9, 0.8)
    assert r["done"] == pytest.approx(0.875)
    assert r["stage_position"] == 2 and r["stages"] == 2
    assert progress_file.progress_record("ft", 1, [1], "done", 0, 1, 3, 3, 9, None, None, finished=True)["done"] == 1.0


def test_line_shows_phase_epoch_accuracies_and_eta():
    r = progress_file.progress_record("finetune", 1, [1], "all", 0, 1, 2, 8, 120, 0.912, 0.88)
    line = progress.format_line("finetune", r, elapsed=10.0)
    assert "stage 1/1 all epoch 2/8 step 120" in line
    assert "target 91.2%" in line and "source 88.0%" in line
    assert line.endswith("10s  ETA 30s")  # a quarter done in 10 s
    assert "starting Ray Train workers" in progress.format_line("finetune", None, 3.0)
    done = progress_file.progress_record("finetune", 1, [1], "done", 0, 1, 8, 8, 400, 0.95, 0.7, finished=True)
    assert progress.format_line("finetune", done, 40.0).endswith("done")
    started = progress_file.progress_record("finetune", 1, [1], "-", 0, 1, 0, 0, 0, None, None)
    assert progress.format_line("finetune", started, 5.0) == "finetune  stage 1/1 training from step 0  5s"


def test_the_end_record_keeps_the_last_accuracies_shown():
    last = progress_file.progress_record("finetune", 1, [1], "all", 0, 1, 8, 8, 400, 0.95, 0.7)
    end = progress_file.progress_record("finetune", 1, [1], "done", 0, 1, 8, 8, 400, None, None, finished=True)
    shown = progress.carry_accuracies(last, end)
    assert shown["finished"] and (shown["target_acc"], shown["source_acc"]) == (0.95, 0.7)
    assert "target 95.0%  source 70.0%" in progress.format_line("finetune", shown, 40.0)
    assert progress.carry_accuracies(last, None) is last and progress.carry_accuracies(None, end) is end


def test_board_prints_a_line_whenever_a_run_moves_on(tmp_path):
    out = io.StringIO()
    board = progress.ProgressBoard(stream=out, every=0.05, live=False)
    run_a, run_b = str(tmp_path / "a"), str(tmp_path / "b")
    with board.watch("finetune", run_a), board.watch("linear_probe", run_b):
        # workers up: a fresh start prints nothing in a log (the driver said the run started), a resume its step
        progress_file.write_progress(run_a, progress_file.progress_record("finetune", 1, [1], "-", 0, 1, 0, 0, 0, None, None))
        progress_file.write_progress(run_b, progress_file.progress_record("linear_probe", 1, [1], "-", 0, 1, 0, 0, 3, None,
                                                                None, resumed_from={"epoch": 0, "global_step": 3}))
        time.sleep(0.3)
        for epoch in (1, 2):
            progress_file.write_progress(run_a, progress_file.progress_record("finetune", 1, [1], "all", 0, 1, epoch, 2,
                                                                    10 * epoch, 0.5 * epoch, 0.9))
            time.sleep(0.3)  # several looks per epoch: one line per change, not per look
        progress_file.write_progress(run_b, progress_file.progress_record("linear_probe", 1, [1], "head", 0, 1, 1, 2, 5, 0.4,
                                                                0.9))
        time.sleep(0.3)
        progress_file.write_progress(run_a, progress_file.progress_record("finetune", 1, [1], "done", 0, 1, 2, 2, 20, 1.0,
                                                                0.9, finished=True))
        # a run's end record carries no accuracies; written just before the run is unwatched (no look in between)
        progress_file.write_progress(run_b, progress_file.progress_record("linear_probe", 1, [1], "done", 0, 1, 2, 2, 10, None,
                                                                None, finished=True))
    lines = out.getvalue().splitlines()
    ft = [ln for ln in lines if ln.startswith("[forgetless] finetune")]
    assert [("epoch 1/2" in ln, "epoch 2/2" in ln, ln.endswith("done")) for ln in ft] == [
        (True, False, False), (False, True, False), (False, True, True)]
    lp = [ln for ln in lines if ln.startswith("[forgetless] linear_probe")]
    assert len(lp) == 3 and "resumed from its checkpoint: stage 1/1 epoch 0 step 3" in lp[0]
    assert lp[-1].endswith("done") and "target 40.0%  source 90.0%" in lp[-1]
    assert "target 100.0%" in ft[-1]


def test_a_board_made_without_a_stream_follows_stderr_as_it_is_now(tmp_path, monkeypatch):
    # The driver's board is one per process; stderr may be replaced after it is made (a redirect, pytest's capture
    # closing the stream it had): a line goes to the stderr of the moment, never to a closed one.
    made_with = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", made_with)
    board = progress.ProgressBoard(every=0.05, live=False)
    made_with.close()
    now = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", now)
    run = str(tmp_path / "run")
    with board.watch("finetune", run):
        progress_file.write_progress(run, progress_file.progress_record("finetune", 1, [1], "done", 0, 1, 1, 1, 5, 0.5,
                                                                        0.9, finished=True))
    assert now.getvalue().startswith("[forgetless] finetune") and now.getvalue().rstrip().endswith("done")


def test_progress_of_a_run_on_s3(s3server, monkeypatch):
    from conftest import point_aws_env_at

    point_aws_env_at(s3server, monkeypatch)
    run_uri = f"s3://{s3server.bucket}/progress-test/run"
    assert progress_file.read_progress(run_uri) is None
    progress_file.write_progress(run_uri, progress_file.progress_record("ft", 1, [1], "all", 0, 1, 1, 2, 7, 0.5, 0.5))
    assert progress_file.read_progress(run_uri)["step"] == 7


def test_live_view_leaves_each_finished_run_as_one_line(tmp_path):
    out = io.StringIO()
    board = progress.ProgressBoard(stream=out, every=0.05, live=True)  # as on a terminal (rich's live block)
    run = str(tmp_path / "run")
    with board.watch("finetune", run):
        progress_file.write_progress(run, progress_file.progress_record("finetune", 1, [1], "all", 0, 1, 1, 2, 10, 0.5, 0.9))
        time.sleep(0.3)
        progress_file.write_progress(run, progress_file.progress_record("finetune", 1, [1], "done", 0, 1, 2, 2, 20, 0.9, 0.9,
                                                              finished=True))
    time.sleep(0.3)  # the board's thread ends its live block once no run is left
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("[forgetless] finetune")]
    assert len(lines) == 1 and lines[0].endswith("done") and "step 20" in lines[0]


def _history(*points):
    """RunState.history records: (stage, epoch, target acc, source acc)."""
    return [{"step": 10 * e, "stage": st, "phase": "all", "epoch": e, "acc": {"0": s, str(max(st, 1)): t},
             "loss": {}, "train_loss": None} for st, e, t, s in points]


def test_final_accuracies_are_the_last_evaluations():
    assert progress_file.final_accuracies(_history((1, 1, 0.5, 0.9), (1, 4, 0.888, 0.7))) == (0.888, 0.7)
    pretrain = [{"step": 6, "stage": 0, "phase": "all", "epoch": 6, "acc": {"0": 0.994}, "loss": {}}]
    assert progress_file.final_accuracies(pretrain) == (None, 0.994)  # the source only: no target
    assert progress_file.final_accuracies([]) == (None, None)


def _stale_then_final(run_uri: str, board: progress.ProgressBoard, settle: float) -> list[str]:
    """A run the board saw at epoch 1 only, which then trained to epoch 4 and ended (its end record carrying no
    accuracies) between two looks; the caller hands over its final state."""
    with board.watch("finetune", run_uri) as shown:
        progress_file.write_progress(run_uri, progress_file.progress_record("finetune", 1, [1], "all", 0, 1, 1, 4, 10,
                                                                            0.575, 0.9))
        deadline = time.monotonic() + settle
        while "epoch 1/4" not in board.stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)  # until the board has looked and printed epoch 1
        for epoch in (2, 3, 4):
            progress_file.write_progress(run_uri, progress_file.progress_record("finetune", 1, [1], "all", 0, 1,
                                                                                epoch, 4, 10 * epoch, 0.8, 0.8))
        progress_file.write_progress(run_uri, progress_file.progress_record("finetune", 1, [1], "done", 0, 1, 4, 4,
                                                                            40, None, None, finished=True))
        shown.ended(_history((1, 1, 0.575, 0.9), (1, 4, 0.888, 0.75)), 40, [1])
    return [ln for ln in board.stream.getvalue().splitlines() if ln.startswith("[forgetless] finetune")]


def test_the_end_line_is_the_runs_final_state_not_the_last_look(tmp_path):
    lines = _stale_then_final(str(tmp_path / "run"), progress.ProgressBoard(stream=io.StringIO(), every=0.05,
                                                                            live=False), settle=10)
    assert "epoch 1/4" in lines[0] and "target 57.5%" in lines[0]
    assert lines[-1].endswith("done") and "epoch 4/4 step 40" in lines[-1]
    assert "target 88.8%  source 75.0%" in lines[-1]  # epoch 4's numbers, as its MLflow run holds them


def test_the_end_line_on_s3_with_the_5s_look(s3server, monkeypatch):
    from conftest import point_aws_env_at

    point_aws_env_at(s3server, monkeypatch)
    board = progress.ProgressBoard(stream=io.StringIO(), every=0.05, live=False)  # S3: one look every 5 s
    lines = _stale_then_final(f"s3://{s3server.bucket}/progress-test/stale", board, settle=20)
    assert "epoch 1/4" in lines[0] and "target 57.5%" in lines[0]
    assert len(lines) == 2 and "target 88.8%  source 75.0%" in lines[-1] and lines[-1].endswith("done")


def test_an_earlier_invocations_file_is_not_shown_and_a_resume_says_where_first(tmp_path):
    run = str(tmp_path / "run")
    # what a stopped invocation left: epoch 10 of 12
    progress_file.write_progress(run, progress_file.progress_record("finetune", 1, [1], "all", 0, 1, 10, 12, 100,
                                                                    0.6, 0.9))
    time.sleep(0.05)
    out = io.StringIO()
    board = progress.ProgressBoard(stream=out, every=0.05, live=False)
    resumed = {"stage": 1, "phase": 0, "epoch": 9, "global_step": 90}
    with board.watch("finetune", run):
        time.sleep(0.3)  # looks that find only the old file: nothing to say
        assert "finetune" not in out.getvalue()
        # the resumed run's first record the board sees is an epoch's end (its start record was missed)
        progress_file.write_progress(run, progress_file.progress_record("finetune", 1, [1], "all", 0, 1, 10, 12, 100,
                                                                        0.61, 0.9, resumed_from=resumed))
        time.sleep(0.3)
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("[forgetless] finetune")]
    assert lines[0] == "[forgetless] finetune  resumed from its checkpoint: stage 1/1 epoch 9 step 90"
    assert "epoch 10/12" in lines[1] and "target 61.0%" in lines[1]
    assert progress_file.read_progress(run, since=time.time() + 60) is None  # older than `since`: not this one's
