"""The first fit of a fresh embedded cluster, with Ray Train's resource requests to a cluster autoscaler (Ray's way:
the first fit starts an AutoscalingCoordinator process and its controller waits on it) and without them (forgetless on
an embedded cluster: _compat/ray_train.NoAutoscalerScalingPolicy), interleaved A B A B, each fit in a cluster of its own.

    python benchmarks/first_fit.py --pairs 3        # writes benchmarks/results/first_fit.json

Each side runs in a child process (`--side`) that starts the cluster as the CLI does, waits `--driver-work` seconds
(the driver's own work before its first run: MLflow, the pre-training plan), and fits an empty train function with
forgetless's LeanTorchTrainer. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("with_requests", "no_requests")


def one_side(side: str, driver_work_s: float) -> None:
    """In a child process: a fresh embedded cluster, then one fit; prints its seconds as JSON."""
    sys.path.insert(0, str(Path(__file__).parent))
    from ray.train import RunConfig, ScalingConfig

    import train_floor
    from forgetless.platform.driver import trainer as lean_trainer
    from forgetless.platform.driver.ray_cluster import init_ray

    init_ray(None, use_gpu=False)
    time.sleep(driver_work_s)
    with tempfile.TemporaryDirectory() as folder:
        entered_file = str(Path(folder, "entered"))
        t0 = time.time()
        with lean_trainer.cleaned_after_the_fit() as record_file:
            lean_trainer.LeanTorchTrainer(
                train_floor._enter, record_file=record_file, asks_autoscaler=side == "with_requests",
                train_loop_config={"entered_file": entered_file}, scaling_config=ScalingConfig(num_workers=2),
                run_config=RunConfig(name=f"first-fit-{side}", storage_path=folder)).fit()
        print(json.dumps({"start": float(Path(entered_file).read_text()) - t0, "total": time.time() - t0}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--driver-work", type=float, default=8.0, help="seconds between ray.init and the fit")
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/first_fit.json"))
    args = ap.parse_args()
    if args.side:
        return one_side(args.side, args.driver_work)
    runs = {side: [] for side in SIDES}
    for i in range(args.pairs):
        for side in SIDES:
            out = subprocess.run([sys.executable, __file__, "--side", side, "--driver-work", str(args.driver_work)],
                                 capture_output=True, text=True, timeout=600, check=True)
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"pair {i + 1} {side}: start {runs[side][-1]['start']:.1f} s, total {runs[side][-1]['total']:.1f} s",
                  flush=True)
    ratios = [b["total"] / a["total"] for a, b in zip(runs["with_requests"], runs["no_requests"])]
    summary = {side: {"min": min(r["total"] for r in runs[side]),
                      "median": statistics.median(r["total"] for r in runs[side])} for side in SIDES}
    summary["total ratio no_requests / with_requests"] = {"min": min(ratios), "median": statistics.median(ratios)}
    Path(args.out).write_text(json.dumps({"driver_work_s": args.driver_work, "runs": runs, "summary": summary},
                                         indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
