"""Driver-side status lines: one format, on stderr (stdout is kept for tables and --json)."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

# Set by `forgetless --verbose` (or by hand); the driver passes it on to every Ray worker (ray_cluster.init_ray).
VERBOSE_VARIABLE = "FORGETLESS_VERBOSE"


def verbose() -> bool:
    """Show what is off by default: Ray Train's per-report lines, DeepSpeed's op-load and known-harmless warnings."""
    return os.environ.get(VERBOSE_VARIABLE, "") not in ("", "0")


# Set by `forgetless --ray-dashboard` (or by hand): an embedded cluster starts Ray's dashboard and metrics.
DASHBOARD_VARIABLE = "FORGETLESS_RAY_DASHBOARD"


def ray_dashboard() -> bool:
    """Whether an embedded cluster starts Ray's dashboard (its web server and module processes) and Ray's metrics.
    Off by default: together ~17 CPU-seconds of the demo's ~130 on 2 cores, its wall time 0.91x without them
    (docs/performance.md); nothing reads the metrics of a cluster that lives for one run."""
    return os.environ.get(DASHBOARD_VARIABLE, "") not in ("", "0")


# The lines forgetless prints, the driver's ("[forgetless] ...") and a run's workers' ("[forgetless finetune] ..."):
# Ray's driver passes worker lines of this shape on one by one (never folded into "[repeated Nx across cluster]").
LINE_PATTERN = r"^\[forgetless[ \]]"


def say(msg: str) -> None:
    print(f"[forgetless] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stdout_kept_for_results(keep: bool) -> Iterator[None]:
    """With `keep` (a command's --json), whatever this process prints to stdout inside the block goes to stderr: Ray
    copies its workers' stdout lines to the driver's stdout, and Ray Tune prints there with --verbose; the caller then
    prints its JSON alone on stdout. (sys.stdout is the process's: every thread's prints are moved.)"""
    if not keep:
        yield
        return
    sys.stdout.flush()
    with contextlib.redirect_stdout(sys.stderr):
        yield
