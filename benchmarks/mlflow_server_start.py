"""What an `mlflow server` (as the tests and cluster/local_stack.py start it) costs with MLflow's job runner and
without it (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false), measured A B A B.

    python benchmarks/mlflow_server_start.py --pairs 3

Each start: a new SQLite store in a temporary folder, the seconds until /health answers, then the CPU-seconds the
server's whole process group used from its start until `--settle` seconds after that (the job runner's huey
consumers start beside the server and import MLflow). Results: benchmarks/results/mlflow_server_start.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from forgetless.platform.driver.ports import free_port

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "mlflow_server_start.json"
BIN = Path(sys.executable).parent


def _group_cpu_seconds(pgid: int) -> float:
    total = 0.0
    for p in psutil.process_iter(["pid"]):
        try:
            if _same_group(p.pid, pgid):
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def one_start(job_runner: bool, settle_s: float, timeout_s: float = 120) -> dict:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true" if job_runner else "false"}
    with tempfile.TemporaryDirectory() as d:
        port = free_port()
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
                                 "--default-artifact-root", Path(d, "artifacts").as_uri()],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
        try:
            while True:
                if time.perf_counter() - t0 > timeout_s:
                    raise RuntimeError(f"mlflow server did not answer /health within {timeout_s} s")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                        break
                except OSError:
                    time.sleep(0.1)
            healthy_s = time.perf_counter() - t0
            time.sleep(settle_s)
            members = sum(1 for p in psutil.process_iter(["pid"]) if _same_group(p.pid, proc.pid))
            cpu = _group_cpu_seconds(proc.pid)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return {"healthy_s": round(healthy_s, 2), "cpu_s": round(cpu, 2), "processes": members}


def _same_group(pid: int, pgid: int) -> bool:
    try:
        return os.getpgid(pid) == pgid
    except (ProcessLookupError, PermissionError):
        return False


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--settle", type=float, default=10.0, help="seconds after /health answers before CPU is read")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {"with_job_runner": [], "without": []}
    for pair in range(1, args.pairs + 1):
        for side in runs:
            runs[side].append(one_start(side == "with_job_runner", args.settle))
            print(f"pair {pair} {side}: {runs[side][-1]}", flush=True)
    summary = {}
    for key in ("healthy_s", "cpu_s"):
        ratios = [b[key] / a[key] for a, b in zip(runs["with_job_runner"], runs["without"])]
        summary[key] = {"without_over_with": [round(r, 3) for r in ratios], "min": round(min(ratios), 3),
                        "median": round(statistics.median(ratios), 3)}
    report = {"pairs": args.pairs, "settle_s": args.settle, "runs": runs, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    for key, s in summary.items():
        print(f"{key}: with {[r[key] for r in runs['with_job_runner']]}  without {[r[key] for r in runs['without']]}  "
              f"without / with min {s['min']} median {s['median']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
