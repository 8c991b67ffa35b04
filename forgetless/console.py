"""Driver-side status lines: one format, on stderr (stdout is kept for tables and --json)."""
from __future__ import annotations

import os
import sys

# Set by `forgetless --verbose` (or by hand); the driver passes it on to every Ray worker (runner.init_ray).
VERBOSE_VARIABLE = "FORGETLESS_VERBOSE"


def verbose() -> bool:
    """Show what is off by default: Ray Train's per-report lines, DeepSpeed's op-load and known-harmless warnings."""
    return os.environ.get(VERBOSE_VARIABLE, "") not in ("", "0")


def say(msg: str) -> None:
    print(f"[forgetless] {msg}", file=sys.stderr, flush=True)
