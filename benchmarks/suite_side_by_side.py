"""The test suite (`make test`'s selection, `-m "not slow"`) as one pytest process and as two side by side
(tests/run_side_by_side.py, as `make test` runs it: the e2e tests in one, the unit tests in the other), A B A B.

    python benchmarks/suite_side_by_side.py --pairs 1

Each side: its wall time, and the machine's busy and idle CPU-seconds over it (from /proc/stat, so Ray's and the
servers' processes count too). Run it alone: it is the whole suite, twice per pair (about 25 minutes a pair on 2
cores). Results: benchmarks/results/suite_side_by_side.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "suite_side_by_side.json"
SIDES = {
    "one process": [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider"],
    "side by side": [sys.executable, "tests/run_side_by_side.py", "-q", "-m", "not slow"],
}


def cpu_ticks() -> tuple[int, int]:
    """(busy, idle) clock ticks of the whole machine since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq = fields[:7]
    return user + nice + system + irq + softirq, idle + iowait


def one_suite(command: list[str]) -> dict:
    busy0, idle0 = cpu_ticks()
    t0 = time.perf_counter()
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    busy1, idle1 = cpu_ticks()
    summaries = [line for line in out.stdout.splitlines() if " in " in line and ("passed" in line or "failed" in line)]
    return {"exit_code": out.returncode, "summaries": summaries, "wall_s": round(wall, 1),
            "busy_cpu_s": round((busy1 - busy0) / 100, 1), "idle_cpu_s": round((idle1 - idle0) / 100, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1, help="A B pairs, interleaved (default 1)")
    args = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {name: [] for name in SIDES}
    for pair in range(1, args.pairs + 1):
        for name, command in SIDES.items():
            print(f"pair {pair}/{args.pairs}: {name} ...", file=sys.stderr, flush=True)
            result = one_suite(command)
            runs[name].append(result)
            print(f"  {result}", file=sys.stderr, flush=True)
    (one, side_by_side) = (runs[name] for name in SIDES)
    ratios = [p["wall_s"] / s["wall_s"] for s, p in zip(one, side_by_side)]
    report = {"runs": runs, "ratio_side_by_side_over_one": [round(r, 3) for r in ratios],
              "min": round(min(ratios), 3), "median": round(statistics.median(ratios), 3)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("ratio_side_by_side_over_one", "min", "median")}))
    return 0 if all(r["exit_code"] == 0 for side in runs.values() for r in side) else 1


if __name__ == "__main__":
    sys.exit(main())
