"""Ray core internals forgetless uses, and their public paths. Written and tested for Ray 2.60 (range below).

- `cluster_folder`: the session folder of the cluster this process is connected to (`ray._private.worker.
  _global_node`; Ray has no public call for it in a process other than the one that called ray.init), where the fits
  of an embedded cluster record their placement groups (platform/driver/trainer.py). Public path: a folder in the
  temp folder named after the cluster's GCS address (costs nothing; it is left behind when the cluster ends).
- `cpu_count`: the CPU count ray.init gives an embedded cluster (`ray._private.utils.get_num_cpus`: container CPU
  limits honoured), checked before Ray starts. Public path: the CPUs this process may run on (a container's CPU quota
  is not seen: a run it cannot place is refused by Ray's own start instead of before it).
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
    from ray._private import utils, worker

    return callable(utils.get_num_cpus) and hasattr(worker, "_global_node")


SEAM = Seam("Ray", "ray", LOW, BELOW, probe=_probe,
            slower="a container's CPU quota is checked by Ray's start instead of before it")


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
