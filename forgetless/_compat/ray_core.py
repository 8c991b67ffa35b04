"""Ray core internals forgetless uses, and their public paths. Written and tested for Ray 2.60 (range below).

- `cluster_folder`: the session folder of the cluster this process is connected to (`ray._private.worker.
  _global_node`; Ray has no public call for it in a process other than the one that called ray.init), where the fits
  of an embedded cluster record their placement groups (platform/driver/trainer.py). Public path: a folder in the
  temp folder named after the cluster's GCS address (costs nothing; it is left behind when the cluster ends).
- `cpu_count`: the CPU count ray.init gives an embedded cluster (`ray._private.utils.get_num_cpus`: container CPU
  limits honoured), checked before Ray starts. Public path: the CPUs this process may run on (a container's CPU quota
  is not seen: a run it cannot place is refused by Ray's own start instead of before it).
- `never_deduplicate`: adds a pattern to the allow regex of the driver's log deduplicators
  (`ray._private.ray_logging.stdout_deduplicator` / `stderr_deduplicator`), which Ray reads from
  `RAY_DEDUP_LOGS_ALLOW_REGEX` once, when first imported. Public path: only a driver started with that variable (a
  submitted job's, which jobs.submit sets) keeps the lines whole; elsewhere a worker's progress lines may be folded
  into "[repeated Nx across cluster]" lines.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import ray

from forgetless._compat import Seam

LOW, BELOW = "2.60", "2.61"  # written and tested with 2.60.0


def _probe() -> bool:
    from ray._private import ray_logging, utils, worker

    return (callable(utils.get_num_cpus) and hasattr(worker, "_global_node")
            and all(hasattr(getattr(ray_logging, name, None), "allow_re")
                    for name in ("stdout_deduplicator", "stderr_deduplicator")))


SEAM = Seam("Ray", "ray", LOW, BELOW, probe=_probe,
            slower="a container's CPU quota is checked by Ray's start instead of before it, and a restarted "
                   "worker's progress lines may be folded into '[repeated Nx across cluster]' lines")


def cluster_folder() -> Path:
    """A folder on this node that belongs to the Ray cluster this process is connected to (every process of the
    cluster finds the same one; another cluster's is another)."""
    if SEAM.active():
        from ray._private import worker

        node = worker._global_node
        if node is not None:  # a connected process (driver, worker, actor) knows its node
            return Path(node.get_session_dir_path())
    address = re.sub(r"[^0-9A-Za-z.-]", "_", ray.get_runtime_context().gcs_address)
    folder = Path(tempfile.gettempdir()) / f"forgetless-ray-{address}"
    folder.mkdir(exist_ok=True)
    return folder


def cpu_count() -> float:
    """The CPUs an embedded Ray cluster started here would get."""
    if SEAM.active():
        from ray._private.utils import get_num_cpus

        return float(get_num_cpus())
    return float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def upload_loggers() -> tuple[str, ...]:
    """The loggers of Ray's lines while it packages a job's working dir and modules for upload (named after Ray's
    private runtime_env modules; jobs.submit keeps them quiet unless --verbose). Public path: the job SDK's logger
    only (Ray's packaging lines then show)."""
    public = ("ray.dashboard.modules.dashboard_sdk",)
    if not SEAM.active():
        return public
    return ("ray._private.runtime_env.working_dir", "ray._private.runtime_env.packaging",
            "ray._private.runtime_env.py_modules", *public)


# Ray's documented variable: a regex of log lines its driver never folds, read once, when Ray is first imported
DEDUP_ALLOW_VARIABLE = "RAY_DEDUP_LOGS_ALLOW_REGEX"


def never_deduplicate(pattern: str) -> None:
    """Worker lines matching `pattern` (a regex) reach this driver's console one by one. Ray's driver folds lines
    from two or more processes that differ only in their numbers ("epoch 4/120", "epoch 5/120") into one
    "[repeated Nx across cluster]" line per 5 s; a run whose rank 0 was restarted (a resize, a lost worker) prints from
    a new process, and its epoch lines were folded away (tests/faults/test_node_loss.py). Public path: nothing here
    (a driver started with DEDUP_ALLOW_VARIABLE in its environment, as a submitted job is, has it from Ray itself)."""
    if not SEAM.active():
        return
    from ray._private import ray_logging

    for dedup in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        current = dedup.allow_re.pattern if dedup.allow_re is not None else ""
        if pattern not in current:
            dedup.allow_re = re.compile(f"{current}|{pattern}" if current else pattern)
