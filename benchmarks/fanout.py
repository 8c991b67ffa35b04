"""A compare's strategy runs one after another vs side by side, on the local multi-node stack (cluster/local_stack.py:
a Ray head, worker nodes, MLflow server, S3), measured A B A B.

    python benchmarks/fanout.py                      # 3 worker nodes x 1 CPU, 3 strategies, 1 Ray Train worker each
    python benchmarks/fanout.py --pairs 3 --nodes 3

Every measured compare is the demo's three strategies (finetune, linear_probe, lp_ft) with 1 worker per run, labelled
afresh each time (so no finished run is reused) and started from one shared pre-training (a warm-up compare does it);
`sequential` is `scaling.max_concurrent: 1`, `fanned out` the default (0) (as many runs as the cluster fits: one per node here).
The wall time is the whole `forgetless compare` process, from the outside. Results: benchmarks/results/fanout.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "cluster"))

STRATEGIES = ["finetune", "linear_probe", "lp_ft"]


def compare(env: dict[str, str], work: Path, storage: str, tag: str, max_concurrent: int | None,
            dashboard: str) -> float:
    """One `forgetless compare` submitted to the stack as a Ray job (as users run it there), followed to its end."""
    import yaml

    cfg = yaml.safe_load((ROOT / "examples/digits_transfer.yaml").read_text())
    cfg.update(storage=storage, strategies=[{"name": s, "label": f"{s}-{tag}"} for s in STRATEGIES],
               scaling={"num_workers": 1, "max_concurrent": max_concurrent or 0},
               tracking={"log_model": False, "experiment": "fanout"})
    (work / "fanout.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "forgetless.cli", "submit", "fanout.yaml", "--address", dashboard,
                    "--command", "compare", "--follow"], check=True, env=env, cwd=work,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    import local_stack

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=3, help="Ray worker nodes of 1 CPU each")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/fanout.json"))
    a = ap.parse_args(argv)
    stack = local_stack.LocalStack(tempfile.mkdtemp(prefix="forgetless-fanout-"), workers=a.nodes, cpus_per_worker=1)
    stack.up()
    try:
        env = {k: v for k, v in {**os.environ, **stack.client_env()}.items() if k != "RAY_ADDRESS"}
        storage, work = f"s3://{stack.bucket}/fanout", Path(tempfile.mkdtemp(prefix="forgetless-fanout-job-"))
        run = lambda tag, n: compare(env, work, storage, tag, n, stack.dashboard)  # noqa: E731
        print(f"warm-up (pre-training, once): {run('warmup', None):.1f} s", flush=True)
        rows = []
        for i in range(a.pairs):  # A B A B: both sides see the same background load
            seq = run(f"seq{i}", 1)
            fan = run(f"fan{i}", None)
            rows.append({"pair": i + 1, "sequential_s": seq, "fanned_out_s": fan, "ratio": fan / seq})
            print(f"pair {i + 1}: sequential {seq:.1f} s, fanned out {fan:.1f} s, ratio {fan / seq:.2f}", flush=True)
    finally:
        stack.down()
    ratios = [r["ratio"] for r in rows]
    summary = {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)}
    print(f"fanned out / sequential: min {summary['min']:.2f}, median {summary['median']:.2f}")
    Path(a.out).write_text(json.dumps({
        "benchmark": "fanout", "nodes": a.nodes, "cpus_per_node": 1, "strategies": STRATEGIES, "workers_per_run": 1,
        "machine_cores": os.cpu_count(), "pairs": rows, "ratio": summary}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
