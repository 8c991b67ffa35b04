"""Where one strategy run's wall time goes: the demo's finetune run (examples/digits_transfer.yaml) repeated, its
time split into the parts of forgetless/platform/worker/timing.py, median and min over the repeats.

    python benchmarks/fixed_cost.py                      # 3 repeats, writes benchmarks/results/fixed_cost.json
    python benchmarks/fixed_cost.py --repeats 5 --label after --set train.epochs=3

The embedded Ray cluster is started once (its start is reported on its own row) and a warm-up run (which also runs
the pre-training) goes before the repeats; each repeat is a fresh Ray Train run of the same strategy (a new label, so nothing is reused),
timed from the driver's side (`compare call`) and split by the worker and the driver (timing.PARTS). `fixed cost` is
everything but the training loop. Run it alone on the machine: other Ray jobs make every part slower.
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

import forgetless
from forgetless.config import StrategyConfig
from forgetless.platform.worker import timing
from forgetless.platform.driver.ray_cluster import init_ray

ROOT = Path(__file__).resolve().parents[1]


def import_seconds() -> float:
    """What a fresh Ray Train worker process imports before the worker function runs (part of start_workers)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import forgetless.platform.worker.train_loop"], check=True,
                   env={**os.environ, "DS_ACCELERATOR": "cpu"})
    return time.perf_counter() - t0


def one_run(config: str, strategy: str, label: str, overrides: list[str]) -> dict[str, float]:
    cfg = forgetless.load_config(config, overrides)
    cfg = cfg.model_copy(update={"strategies": [StrategyConfig(name=strategy, label=label)]})
    t0 = time.perf_counter()
    out = forgetless.compare(cfg)
    call = time.perf_counter() - t0
    res = out.results[0]
    parts = dict(res.seconds)
    parts["compare call"] = call
    parts["fixed cost"] = timing.fixed_cost(res.seconds)
    parts["driver: compare set-up and summary"] = call - sum(res.seconds.values())
    return parts


def table(runs: list[dict[str, float]], cluster_start: float, imports: float) -> str:
    order = list(timing.PARTS) + ["driver: compare set-up and summary", "fixed cost", "compare call"]
    lines = ["| part | median s | min s | what it covers |", "|---|---|---|---|",
             f"| cluster start (once per driver) | {cluster_start:.1f} | {cluster_start:.1f} | ray.init of the embedded "
             f"cluster |",
             f"| (reference) imports of a worker | {imports:.1f} | {imports:.1f} | a fresh python importing "
             f"forgetless.platform.worker.train_loop, inside start_workers |"]
    for part in order:
        values = [r.get(part, 0.0) for r in runs]
        what = timing.PARTS.get(part, "")
        lines.append(f"| {part} | {statistics.median(values):.2f} | {min(values):.2f} | {what} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "examples/digits_transfer.yaml"))
    ap.add_argument("--strategy", default="finetune")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--label", default="current", help="a name for this measurement in the results file")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override, e.g. train.epochs=3")
    args = ap.parse_args()
    config = str(Path(args.config).resolve())
    imports = import_seconds()
    with tempfile.TemporaryDirectory(prefix="forgetless-fixed-cost-") as d:
        os.chdir(d)
        t0 = time.perf_counter()
        init_ray(None, use_gpu=False)
        cluster_start = time.perf_counter() - t0
        one_run(config, args.strategy, "warm-up", args.overrides)  # also the pre-training the repeats share
        runs = []
        for i in range(args.repeats):
            runs.append(one_run(config, args.strategy, f"{args.strategy}-{i}", args.overrides))
            print(f"repeat {i + 1}/{args.repeats}: {runs[-1]['compare call']:.1f} s", flush=True)
    text = table(runs, cluster_start, imports)
    print(text)
    out = ROOT / "benchmarks/results/fixed_cost.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    results[args.label] = {"config": args.config, "strategy": args.strategy, "overrides": args.overrides,
                           "cluster_start": cluster_start, "worker_imports": imports, "runs": runs, "table": text}
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
