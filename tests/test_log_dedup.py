"""Worker lines of forgetless reach the driver one by one (issue 32: a resized run's epoch lines were folded away by
Ray's log deduplication, found by tests/faults/test_node_loss.py). Ray's own deduplicator, fed as its driver feeds it:
batches of lines from two worker processes (a rank 0 before and after a restart)."""
from __future__ import annotations

import re

import pytest
from ray._private import ray_logging

from forgetless import console
from forgetless._compat import ray_core
from forgetless.platform.driver import jobs


def _batch(pid: int, *lines: str) -> dict:
    return {"ip": "10.0.0.1", "pid": pid, "job": "01000000", "is_err": True, "lines": list(lines),
            "actor_name": "RayTrainWorker", "task_name": None}


def _printed(dedup, batches) -> list[str]:
    return [line for b in batches for out in dedup.deduplicate(b) for line in out["lines"]]


def _epochs(lines) -> list[int]:
    return [int(m) for line in lines for m in re.findall(r"epoch (\d+)/120$", line)]


BEFORE = _batch(101, "[forgetless lost] stage 1 phase finetune epoch 3/120")
AFTER = [_batch(202, f"[forgetless lost] stage 1 phase finetune epoch {e}/120") for e in (4, 5, 6)]


def test_rays_default_folds_a_restarted_workers_epoch_lines():
    """What the fix is for: with Ray's defaults, the new process's epoch lines are held back and folded."""
    dedup = ray_logging.LogDeduplicator(5, None, None, _timesource=lambda: 0.0)
    assert _epochs(_printed(dedup, [BEFORE, *AFTER])) == [3]


@pytest.fixture
def driver_deduplicators():
    kept = {d: d.allow_re for d in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator)}
    yield
    for dedup, allow in kept.items():
        dedup.allow_re = allow


def test_forgetless_lines_pass_one_by_one_and_others_are_still_folded(driver_deduplicators):
    ray_core.never_deduplicate(console.LINE_PATTERN)
    ray_core.never_deduplicate(console.LINE_PATTERN)  # a second driver call in the process: no change
    for dedup in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        assert dedup.allow_re.pattern.count(console.LINE_PATTERN) == 1
    probe = ray_logging.LogDeduplicator(5, None, None, _timesource=lambda: 0.0)
    probe.allow_re = ray_logging.stderr_deduplicator.allow_re
    assert _epochs(_printed(probe, [BEFORE, *AFTER])) == [3, 4, 5, 6]
    # Ray's own repeated lines from several processes are still folded
    other = [_batch(pid, f"WARNING worker {pid} something happened") for pid in (1, 2, 3)]
    assert len(_printed(probe, other)) == 1
    # what the user's RAY_DEDUP_LOGS_ALLOW_REGEX (here Ray's default, its testing token) let through still passes
    assert probe.allow_re.search("__ray_testing_never_deduplicate__")


def test_a_submitted_jobs_driver_gets_the_pattern_from_rays_variable():
    env = jobs.job_env(forward_credentials=False)
    assert env[ray_core.DEDUP_ALLOW_VARIABLE] == console.LINE_PATTERN
    assert re.search(env[ray_core.DEDUP_ALLOW_VARIABLE], "[forgetless lost] stage 1 phase finetune epoch 4/120")
    assert re.search(env[ray_core.DEDUP_ALLOW_VARIABLE], "[forgetless] finetune  epoch 4/8")
    assert not re.search(env[ray_core.DEDUP_ALLOW_VARIABLE], "(pid=1) [forgetlessness] no")
