"""The demo (`forgetless compare examples/digits_transfer.yaml` in an empty folder), an earlier commit against this
checkout, measured A B A B.

    python benchmarks/demo.py --before 114cc5e --pairs 2

Each side runs from its own checkout (the earlier commit as a git worktree in a temporary folder, imported first via
PYTHONPATH, which Ray's worker processes inherit), in a new empty folder, so every run starts its own embedded cluster
and pre-trains. Every console line is timestamped (seconds since launch), so the table also says when the first line,
the first run's start line and its first epoch line came. Run it alone: the two sides share the machine's cores in
turn, and a ratio is only as good as the quiet around it. Results: benchmarks/results/demo.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "demo.json"


def timed_demo(source: Path, work: Path) -> dict:
    """One demo in `work` with the code of `source`: wall time, console line counts, when key lines came."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    cmd = [sys.executable, "-m", "forgetless.cli", "compare", str(source / "examples" / "digits_transfer.yaml")]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: dict[str, list[tuple[float, str]]] = {"stdout": [], "stderr": []}

    def pump(stream, key):
        for line in stream:
            lines[key].append((round(time.perf_counter() - t0, 1), line.rstrip("\n")))

    pumps = [threading.Thread(target=pump, args=(proc.stdout, "stdout")),
             threading.Thread(target=pump, args=(proc.stderr, "stderr"))]
    for p in pumps:
        p.start()
    rc = proc.wait()
    for p in pumps:
        p.join()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"the demo failed (exit {rc}) in {work}:\n" + "\n".join(s for _, s in lines["stderr"][-20:]))
    first = lambda pred: next((t for t, s in lines["stderr"] if pred(s)), None)  # noqa: E731
    return {"wall_s": round(wall, 1), "stdout_lines": len(lines["stdout"]), "stderr_lines": len(lines["stderr"]),
            "first_line_s": lines["stderr"][0][0] if lines["stderr"] else None,
            "first_run_start_s": first(lambda s: "Ray Train run" in s),
            "first_epoch_line_s": first(lambda s: " epoch " in s and "stage " in s),
            "console": [f"{t:7.1f} {s}" for t, s in lines["stderr"]] + [f"{t:7.1f} {s}" for t, s in lines["stdout"]]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="the earlier commit (any git revision)")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="forgetless_demo_"))
    before = tmp / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before], check=True,
                   capture_output=True)
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    try:
        for pair in range(1, args.pairs + 1):
            for side, source in (("before", before), ("after", ROOT)):
                work = tmp / f"{side}-{pair}"
                work.mkdir()
                runs[side].append(timed_demo(source, work))
                print(f"pair {pair} {side}: {runs[side][-1]['wall_s']} s", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], capture_output=True)
    ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(runs["after"], runs["before"])]
    report = {"before": args.before, "pairs": args.pairs, "runs": runs,
              "after_over_before": {"values": [round(r, 3) for r in ratios], "min": round(min(ratios), 3),
                                    "median": round(statistics.median(ratios), 3)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    for k in ("wall_s", "first_line_s", "first_run_start_s", "first_epoch_line_s", "stderr_lines"):
        print(f"{k:20s} before {[r[k] for r in runs['before']]}  after {[r[k] for r in runs['after']]}")
    print(f"after / before: {report['after_over_before']}; wrote {args.out}")


if __name__ == "__main__":
    main()
