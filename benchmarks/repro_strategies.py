"""Reproduction experiments of docs/strategies.md: run the example configs over several seeds, print mean ± std tables.

    python benchmarks/repro_strategies.py --experiment fast stream --seeds 0 1 2
    python benchmarks/repro_strategies.py --experiment all --seeds 0 1 2 --json benchmarks/results/strategies.json

Each experiment is one `forgetless compare --seeds ...` (one MLflow parent run holding the mean ± sd aggregates; every
strategy of a seed from that seed's pre-trained checkpoint). The seed changes the pre-training, the head initialisation and the data order; the task
splits are fixed. Numbers are whatever the runs measure: nothing is filtered or tuned after the fact.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, also when run from another folder (own mlflow.db there)

EXPERIMENTS = {
    # name: (config, extra overrides, metrics shown (name, header, as percent))
    "fast": ("examples/fast_vs_finetune.yaml", [], [
        ("steps_to/90", "steps to 90%", False), ("source/auc", "source AUC %", True),
        ("acc", "ACC %", True), ("source/acc_after", "source after %", True),
        ("optimizer_steps", "steps", False)]),
    # the FAST claim at equal optimizer-step budgets: every strategy gets exactly 90 steps over its phases; enough epochs
    # that no phase is cut by its epoch count (FAST's align phase runs until its plateau rule or align_max_steps)
    "fast_budget": ("examples/fast_vs_finetune.yaml", ["train.epochs=20", "train.step_budget=90"], [
        ("steps_to/90", "steps to 90%", False), ("source/auc", "source AUC %", True),
        ("acc", "ACC %", True), ("source/acc_after", "source after %", True),
        ("optimizer_steps", "steps", False)]),
    "stream": ("examples/split_digits_stream.yaml", [], [
        ("acc", "ACC %", True), ("bwt", "BWT pp", True), ("forgetting/max", "forgetting pp", True),
        ("source/forgetting", "source forgetting pp", True), ("acc_with_source", "ACC with source %", True),
        ("source/acc_after", "source after %", True), ("trainable_params/max", "trainable params", False)]),
    "stream_ci": ("examples/split_digits_stream.yaml", [
        "evaluation=class_incremental",
        "strategies=[input_space_ci, finetune, {name: ewc, params: {ewc_lambda: 1000}}, lwf]"], None),
    "stream_mnist1d": ("examples/split_mnist1d_stream.yaml", [], None),
}
EXPERIMENTS["stream_ci"] = (*EXPERIMENTS["stream_ci"][:2], EXPERIMENTS["stream"][2])
EXPERIMENTS["stream_mnist1d"] = (*EXPERIMENTS["stream_mnist1d"][:2], EXPERIMENTS["stream"][2])


def run_experiment(name: str, seeds: list[int], extra: list[str]) -> dict[str, list[dict[str, float]]]:
    """{strategy label: [metrics of seed 0, seed 1, ...]}"""
    import forgetless

    config, overrides, _ = EXPERIMENTS[name]
    per_label: dict[str, list[dict[str, float]]] = {}
    # one compare over every seed (forgetless's --seeds): one MLflow parent with the aggregates, runs side by side
    # where the cluster has room
    out = forgetless.compare(str(ROOT / config), overrides=[*overrides, *extra], seeds=seeds)
    for r in out.results:
        per_label.setdefault(r.label, []).append(
            {**r.metrics, "seed": r.seed, "R": r.accuracy_matrix.tolist(), "mlflow_run_id": r.mlflow_run_id,
             "phase_log": r.phase_log, "history": r.history})
    print(out.table(), file=sys.stderr, flush=True)
    return per_label


def collect_from_mlflow(uri: str, name: str) -> dict[str, list[dict[str, float]]]:
    """The same per-label lists, read back from the finished compare runs of an MLflow store (e.g. of a stopped run)."""
    import mlflow

    import forgetless

    config, overrides, _ = EXPERIMENTS[name]
    cfg = forgetless.load_config(str(ROOT / config), overrides=list(overrides))
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    parents = client.search_runs(
        [exp.experiment_id], f"tags.`forgetless.name` = '{cfg.name}' and tags.`forgetless.evaluation` = "
                             f"'{cfg.evaluation}' and attributes.status = 'FINISHED' and tags.`forgetless.command` = "
                             f"'compare'", order_by=["attributes.start_time ASC"])
    per_label: dict[str, list[dict[str, float]]] = {}
    for parent in parents:
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and "
                                                           f"tags.`forgetless.mode` = 'transfer'")
        for ch in sorted(children, key=lambda r: r.info.start_time):
            per_label.setdefault(ch.info.run_name, []).append(
                {**python_metrics(ch.data.metrics), "seed": int(ch.data.params.get("seed", parent.data.params["seed"])),
                 "mlflow_run_id": ch.info.run_id})
    return per_label


def python_metrics(logged: dict[str, float]) -> dict[str, float]:
    """A run's summary metrics under the Python API's names and units (fractions): MLflow holds them in the units of
    the comparison table, named so (`forgetting/max_pp`, `acc_pct`, ...; runs logged under the old names read as
    today's, docs/metrics.md)."""
    from forgetless.platform.analysis.results import metrics_from_mlflow

    return metrics_from_mlflow(logged)


def mean_std(values: list[float], pct: bool) -> str:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    scale = 100.0 if pct else 1.0
    m = sum(vals) / len(vals) * scale
    s = (math.sqrt(sum((v * scale - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0)
    missing = f" ({len(values) - len(vals)} n/a)" if len(vals) < len(values) else ""
    if not pct and (abs(m) >= 1000 or all(float(v).is_integer() for v in vals)):
        return f"{m:.0f} ± {s:.0f}{missing}"
    return f"{m:.1f} ± {s:.1f}{missing}"


def markdown_table(name: str, per_label: dict[str, list[dict]]) -> str:
    from forgetless.platform.analysis.results import read_metrics

    # a result file written under the old metric names reads under today's (its R recomputes BWT, docs/metrics.md)
    per_label = {label: [read_metrics(r, r.get("R")) for r in runs] for label, runs in per_label.items()}
    cols = EXPERIMENTS[name][2]
    n = len(next(iter(per_label.values())))
    lines = [f"| strategy ({n} seeds) | " + " | ".join(h for _, h, _ in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for label, runs in per_label.items():
        lines.append(f"| {label} | " + " | ".join(mean_std([r.get(m) for r in runs], pct) for m, _, pct in cols)
                     + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", choices=[*EXPERIMENTS, "all"], nargs="+", default=["all"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra config override, key=value")
    p.add_argument("--json", help="also write every seed's metrics and accuracy matrix to this file")
    p.add_argument("--from-json", help="print the tables of an earlier --json file instead of running")
    p.add_argument("--from-mlflow", help="print the tables of the finished compare runs in this MLflow store "
                                         "(e.g. sqlite:///mlflow.db of a stopped run) instead of running")
    args = p.parse_args(argv)
    names = list(EXPERIMENTS) if "all" in args.experiment else args.experiment
    results = json.loads(Path(args.from_json).read_text()) if args.from_json else {}
    if args.from_json:
        names = [n for n in names if n in results]
    for name in names:
        if args.from_mlflow:
            results[name] = collect_from_mlflow(args.from_mlflow, name)
            if not results[name]:
                continue
        elif not args.from_json:
            results[name] = run_experiment(name, args.seeds, args.extra)
        print(f"\n### {name}: {EXPERIMENTS[name][0]} {' '.join(EXPERIMENTS[name][1])}\n")
        print(markdown_table(name, results[name]), flush=True)
        if args.json and not (args.from_json or args.from_mlflow):  # after every experiment: a long run that is stopped keeps what it has
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
