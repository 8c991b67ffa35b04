"""A failure inside a worker that no preflight can know (issue 34, part 3) reaches the console as one line naming the
run, the worker (rank) and the exception's message; the tracebacks go to the run's failure.log (under the run's
storage folder), not hundreds of lines to the console.

The end-to-end case is a real failure: `forgetless run` whose backbone.weights passes the preflight and is then
overwritten with bytes that are not weights, before the pre-training's workers load it (the driver's preflight step is
wrapped in the subprocess to do that, nothing else is changed).
"""
from __future__ import annotations

import copy
import logging
import os
import re
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY
from ray.train import WorkerGroupError

from forgetless._compat import ray_train as ray_train_seam
from forgetless.errors import RunFailed
from forgetless.platform.driver import run_failures
from forgetless.platform.worker import failure_log

ANSI = re.compile(r"\x1b\[[0-9;]*m")

# The real CLI, with backbone.weights overwritten once the preflight has checked it (argv[1]: the weights file).
CORRUPT_AFTER_PREFLIGHT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from forgetless import cli
    from forgetless.platform.driver import runner

    checked = runner.preflight

    def preflight_then_corrupt(cfg):
        uri = checked(cfg)
        Path(sys.argv[1]).write_bytes(b"these bytes are not weights any more")
        return uri

    runner.preflight = preflight_then_corrupt
    cli.entry(sys.argv[2:])
""")


def test_the_line_names_the_run_the_worker_and_the_message_and_the_log_holds_the_tracebacks(tmp_path):
    run_uri = str(tmp_path / "tiny-finetune-abc")
    for rank in (0, 1):  # what the workers append (one traceback per failure of the worker group)
        try:
            raise ValueError(f"stage {rank} has no task")
        except ValueError as e:
            text = "".join(traceback.format_exception(e))
        Path(failure_log.rank_log_uri(run_uri, rank)).parent.mkdir(parents=True, exist_ok=True)
        Path(failure_log.rank_log_uri(run_uri, rank)).write_text(
            f"{failure_log.HEADER_MARK}earlier: rank {rank}\nold traceback\n{failure_log.HEADER_MARK}now: rank {rank}\n"
            f"{text}")
    error = WorkerGroupError("[Rank 0,1 Error Snippet]: ...", {1: ValueError("stage 1 has no task"),
                                                                0: ValueError("stage 0 has no task\nsecond line")})
    failed = run_failures.worker_failure("tiny-finetune-abc", run_uri, error)
    assert isinstance(failed, RunFailed)
    log = Path(run_uri, run_failures.FAILURE_LOG)
    assert str(failed) == (f"run tiny-finetune-abc failed in worker rank 0 (and rank 1): ValueError: stage 0 has no "
                           f"task; full traceback in {log}")
    text = log.read_text()
    assert "Ray Train: Training failed due to worker errors" in text
    assert text.index("--- worker rank 0") < text.index("now: rank 0") < text.index("--- worker rank 1")
    assert "ValueError: stage 1 has no task" in text and "old traceback" not in text  # the newest of each rank
    assert f"earlier failures of this rank: {failure_log.rank_log_uri(run_uri, 0)}" in text


def test_a_worker_that_wrote_no_traceback_is_named_with_what_ray_saw(tmp_path):
    error = WorkerGroupError("[Rank 0 Error Snippet]: the actor died", {0: RuntimeError("the actor died " + "x" * 400)})
    failed = str(run_failures.worker_failure("r", str(tmp_path / "r"), error))
    assert failed.startswith("run r failed in worker rank 0: RuntimeError: the actor died xxx")
    assert len(failed) < 400 and failed.count("\n") == 0
    assert "the worker wrote no traceback" in (tmp_path / "r" / run_failures.FAILURE_LOG).read_text()


def test_ray_trains_traceback_record_is_dropped_once_written():
    logger = logging.getLogger(ray_train_seam.train_error_logger_name())
    before = list(logger.filters)
    try:
        failure_log._keep_ray_traceback_off_the_console()
        failure_log._keep_ray_traceback_off_the_console()  # once only
        added = [f for f in logger.filters if f not in before]
        assert len(added) == 1
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "Error in training function:\nTb", (), None)
        assert not logger.filter(record)
        other = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "something else", (), None)
        assert logger.filter(other)
    finally:
        logger.filters[:] = before


@pytest.mark.e2e
def test_a_failure_inside_the_workers_is_one_console_line_and_a_traceback_in_the_runs_log(tmp_path):
    """~1 min on 2 cores: Ray starts, the pre-training's two workers fail loading the overwritten weights."""
    weights = tmp_path / "weights.pt"
    from forgetless.backbones import build_backbone

    torch.save(build_backbone("mlp", (64,), {"hidden": [32]}).state_dict(), weights)
    cfg = copy.deepcopy(TINY)
    cfg["backbone"]["weights"] = str(weights)
    cfg["fault_tolerance"] = {"max_failures": 0}  # fail on the first error (no restarts of the worker group)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "driver.py").write_text(CORRUPT_AFTER_PREFLIGHT)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    out = subprocess.run([sys.executable, "driver.py", str(weights), "run", "c.yaml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    console = ANSI.sub("", out.stdout + out.stderr)
    assert out.returncode == 1, console
    errors = [line for line in out.stderr.splitlines() if line.startswith("forgetless: error: ")]
    assert len(errors) == 1, console
    line = errors[0]
    # the first rank whose failure Ray Train saw (it stops the group then, so the other may not get to fail)
    m = re.fullmatch(r"forgetless: error: run (tiny-pretrain-\w+) failed in worker rank ([01])(?: \(and rank [01]"
                     r"(?:, the same error)?\))?: (\w+): (.+); full traceback in (\S+)", line)
    assert m, line
    run_name, rank, error_type, message, log = m.groups()
    if ray_train_seam.train_error_logger_name() is None:  # the seam off (FORGETLESS_PUBLIC_PATHS=1): Ray's record
        assert "Error in training function" in console  # prints, as documented; the driver's line is one line still
    else:
        assert "Traceback" not in console and "Error in training function" not in console, console
        assert len(console.splitlines()) <= 8, console  # the progress lines and the error; no traceback of any rank
    log = Path(log)
    assert log == tmp_path / "forgetless_runs" / run_name / "failure.log", line
    text = log.read_text()
    section = text.split(f"--- worker rank {rank}: {error_type}: {message.rstrip('…')}")[1]  # (a long one is cut)
    assert "Traceback (most recent call last)" in section and "load_torch_file" in section, text
    assert f"\n{error_type}: {message.rstrip('…')}" in section, text  # where the rank's traceback ends
    assert (log.parent / "failure" / f"rank{rank}.log").exists()
