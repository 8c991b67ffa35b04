"""Reproduce EXPANSE's claims through the platform (Ray Train + DeepSpeed, MLflow), several seeds.

Runs `forgetless.compare` on examples/expanse_digits_to_mnist1d.yaml (digits -> MNIST-1D resampled to 64: a distant
target) once per seed: linear_probe, finetune, two-step EXPANSE and one-step EXPANSE from one pre-trained backbone per
seed. Reports source test accuracy before / after (EXPANSE must be exactly equal), target test accuracy, and the number
of trainable parameters; every run is in MLflow (./mlflow.db) with its R heatmap and curves.

    python benchmarks/repro_expanse.py --seeds 0 1 2 [--config examples/expanse_digits_to_mnist1d.yaml] [--set k=v ...]

Writes benchmarks/results/expanse_<config name>.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import forgetless


def mean_std(values, pct=True):
    values = [100 * v if pct else v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).parents[1] / "examples/expanse_digits_to_mnist1d.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    runs = []
    for seed in args.seeds:
        res = forgetless.compare(args.config, overrides=[f"seed={seed}", *args.overrides])
        print(res.table(), flush=True)
        for r in res.results:
            R = r.accuracy_matrix
            runs.append({"seed": seed, "label": r.label, "source_before": float(R[0][0]), "source_after": float(R[1][0]),
                         "target": float(R[1][1]), "trainable": r.metrics["trainable_params/max"],
                         "steps_to_90": r.metrics["steps_to/90"], "wall_seconds": r.wall_seconds,
                         "mlflow_run_id": r.mlflow_run_id, "source_exact": bool(R[1][0] == R[0][0])})
    name = forgetless.load_config(args.config).name
    out = Path(__file__).parent / "results" / f"expanse_{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "runs": runs}, indent=1))
    labels = list(dict.fromkeys(r["label"] for r in runs))
    print(f"\n{name}: test accuracy %, mean ± std over seeds {args.seeds}\n")
    print("| strategy | target acc | source before | source after | source exactly equal | trainable params |")
    print("|---|---|---|---|---|---|")
    for label in labels:
        rs = [r for r in runs if r["label"] == label]
        print(f"| {label} | {mean_std([r['target'] for r in rs])} | {mean_std([r['source_before'] for r in rs])} | "
              f"{mean_std([r['source_after'] for r in rs])} | {sum(r['source_exact'] for r in rs)}/{len(rs)} | "
              f"{int(rs[0]['trainable'])} |")


if __name__ == "__main__":
    main()
