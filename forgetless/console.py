"""Driver-side status lines: one format, on stderr (stdout is kept for tables and --json)."""
from __future__ import annotations

import sys


def say(msg: str) -> None:
    print(f"[forgetless] {msg}", file=sys.stderr, flush=True)
