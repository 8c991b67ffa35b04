"""`make test` / `make test-all`: the suite as two pytest processes side by side on one machine.

    python tests/run_side_by_side.py [-m EXPR] [pytest args...]

One process runs the end-to-end tests (`e2e`: Ray clusters, DeepSpeed workers, servers; each keeps about two cores
busy), the other everything else (unit tests: mostly one core) and prints its output once it is done. One process
for the whole suite left the cores of a 2-core machine idle about 29% of the time; two processes that each run Ray
tests (pytest-xdist) made those tests 2.5-3x slower each instead of 2x, and the total no better
(docs/performance.md). The exit code is the first non-zero one of the two (5, no tests selected, counts as a failure).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def split(argv: list[str]) -> tuple[str, list[str]]:
    """The marker expression (`-m EXPR`, default: every test) and the other pytest arguments."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-m", dest="expr", default="")
    args, rest = parser.parse_known_args(argv)
    return args.expr, rest


def main(argv: list[str]) -> int:
    expr, rest = split(argv)
    within = f"({expr}) and " if expr else ""
    pytest = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *rest]
    with tempfile.TemporaryFile("w+") as unit_log:
        unit = subprocess.Popen([*pytest, "-m", f"{within}not e2e"], cwd=ROOT, stdout=unit_log,
                                stderr=subprocess.STDOUT, text=True)
        print(f"[tests] unit tests in the background (pid {unit.pid}); the end-to-end tests here:", flush=True)
        e2e_code = subprocess.call([*pytest, "-m", f"{within}e2e"], cwd=ROOT)
        unit_code = unit.wait()
        unit_log.seek(0)
        print("[tests] the unit tests:\n" + unit_log.read(), flush=True)
    print(f"[tests] exit codes: end-to-end {e2e_code}, unit {unit_code}", flush=True)
    return e2e_code or unit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
