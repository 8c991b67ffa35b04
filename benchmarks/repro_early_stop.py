"""Reproduce the early-stopping effect of pre-training (Gutstein et al., arXiv 2106.11174) with `forgetless tune`,
and measure what ASHA saves against the full grid.

    python benchmarks/repro_early_stop.py [--config examples/repro_early_stop.yaml] [--workdir DIR] [--no-asha]

1. A grid search over {stop point x learning rate x draw of the few target samples} (the config's `search:`).
   Per draw it compares three starting points, each with the learning rate the validation set prefers:
   - the stop point the search picks (best validation target accuracy),
   - the checkpoint with the best source validation accuracy (what one would normally transfer),
   - the final checkpoint;
   and reports their target *test* accuracy, mean and standard deviation over the draws, and the differences.
2. The same search with the ASHA scheduler: trial-epochs run and wall time against the grid, and whether it finds the
   same best configuration (per draw, and overall).

Results go to stdout (markdown) and benchmarks/results/repro_early_stop.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's package, also when run from another folder (its own mlflow.db there)
DRAW_KEY = "targets.0.split_seed"


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def _fmt(s: dict[str, float], pct: bool = True) -> str:
    k = 100 if pct else 1
    return f"{k * s['mean']:.1f} ± {k * s['std']:.1f}"


def _best(trials, key=lambda t: t.objective):
    return max(trials, key=key) if trials else None


def analyse(res) -> dict:
    """Per draw: target test accuracy from the searched stop point, the best-source checkpoint, the final one."""
    src = res.source_acc_by_stop_point
    best_source_sp = max(src, key=lambda e: (src[e], -e))  # ties: the earlier checkpoint
    final_sp = max(src)
    finished = [t for t in res.trials if t.status == "finished"]
    draws = sorted({t.params[DRAW_KEY] for t in finished})
    rows, per_sp = [], {}
    for d in draws:
        mine = [t for t in finished if t.params[DRAW_KEY] == d]
        searched = _best(mine)
        at = {sp: _best([t for t in mine if t.stop_point == sp]) for sp in sorted({t.stop_point for t in mine})}
        if best_source_sp not in at or final_sp not in at:
            continue  # a partial search (--from-mlflow while it runs): this draw is not complete yet
        for sp, t in at.items():
            per_sp.setdefault(sp, []).append(t.metrics["test/target/acc"])
        rows.append({"draw": d, "searched_stop_point": searched.stop_point, "searched_lr": searched.params["train.lr"],
                     "searched": searched.metrics["test/target/acc"],
                     "best_source": at[best_source_sp].metrics["test/target/acc"],
                     "final": at[final_sp].metrics["test/target/acc"]})
    return {
        "best_source_stop_point": best_source_sp, "final_stop_point": final_sp,
        "source_val_acc": {str(k): v for k, v in sorted(src.items())},
        "per_draw": rows,
        "finished_trials": len(finished),
        "searched": _stats([r["searched"] for r in rows]),
        "best_source": _stats([r["best_source"] for r in rows]),
        "final": _stats([r["final"] for r in rows]),
        "searched_minus_best_source": _stats([r["searched"] - r["best_source"] for r in rows]),
        "searched_minus_final": _stats([r["searched"] - r["final"] for r in rows]),
        "target_test_acc_by_stop_point": {str(sp): _stats(v) for sp, v in sorted(per_sp.items())},
    }


def best_per_draw(res) -> dict:
    out = {}
    for t in res.trials:
        if t.status != "finished":
            continue
        d = t.params[DRAW_KEY]
        if d not in out or t.objective > out[d].objective:
            out[d] = t
    return {d: {"stop_point": t.stop_point, "lr": t.params["train.lr"]} for d, t in out.items()}


def main() -> None:
    import forgetless
    from forgetless.config import load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "examples/repro_early_stop.yaml"))
    ap.add_argument("--workdir", default="/tmp/forgetless_repro_early_stop")
    ap.add_argument("--no-asha", action="store_true", help="skip the ASHA comparison")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/repro_early_stop.json"))
    ap.add_argument("--from-mlflow", metavar="PARENT_RUN_ID",
                    help="only analyse the finished trials of a search already in the workdir's MLflow store")
    args = ap.parse_args()
    if args.from_mlflow:
        from forgetless.platform.tracking.mlflow_runs import resolve_tracking_uri
        from forgetless.platform.tuning import load_search

        os.chdir(args.workdir)
        res = load_search(resolve_tracking_uri(None), args.from_mlflow)
        print(res.table())
        print(json.dumps(analyse(res), indent=1, default=str))
        return

    cfg = load_config(args.config)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    # resume=True: re-running the script reloads a finished search instead of refusing it. Wall time = the trials
    # alone (Tuner.fit), so the one-off pre-training does not count against the grid.
    grid = forgetless.tune(cfg, resume=True)
    grid_wall = grid.tune_seconds
    report = {"config": args.config, "grid": {"trials": len(grid.trials), "trial_epochs": grid.trial_epochs,
                                              "wall_seconds": grid_wall, "parent_run_id": grid.parent_run_id},
              "analysis": analyse(grid)}
    print(grid.table())
    if not args.no_asha:
        asha_search = cfg.search.model_dump()
        asha_search.update(scheduler="asha", asha={"grace_period": 2, "reduction_factor": 2})
        asha = forgetless.tune(cfg, search=asha_search, resume=True)
        asha_wall = asha.tune_seconds
        print(asha.table())
        report["asha"] = {
            "trials": len(asha.trials), "stopped_early": sum(t.status == "stopped_early" for t in asha.trials),
            "trial_epochs": asha.trial_epochs, "wall_seconds": asha_wall, "parent_run_id": asha.parent_run_id,
            "same_best_overall": asha.best_config == grid.best_config,
            "grid_best": grid.best_config, "asha_best": asha.best_config,
            "best_per_draw_grid": best_per_draw(grid), "best_per_draw_asha": best_per_draw(asha),
            "trial_epochs_saved": 1 - asha.trial_epochs / grid.trial_epochs,
            "wall_saved": 1 - asha_wall / grid_wall,
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))

    a = report["analysis"]
    print("\n## Early stopping of pre-training: target test accuracy (%), mean ± std over "
          f"{len(a['per_draw'])} draws of the target samples")
    print(f"source val acc by stop point: {a['source_val_acc']}")
    print(f"| start from | target test acc |\n|---|---|\n| stop point the search picks | {_fmt(a['searched'])} |\n"
          f"| best-source checkpoint (epoch {a['best_source_stop_point']}) | {_fmt(a['best_source'])} |\n"
          f"| final checkpoint (epoch {a['final_stop_point']}) | {_fmt(a['final'])} |")
    print(f"searched - best source: {_fmt(a['searched_minus_best_source'])} points; "
          f"searched - final: {_fmt(a['searched_minus_final'])} points")
    print("per draw:", json.dumps(a["per_draw"]))
    print("by stop point (best lr by validation, per draw):",
          {sp: _fmt(s) for sp, s in a["target_test_acc_by_stop_point"].items()})
    if "asha" in report:
        s = report["asha"]
        print(f"\n## ASHA vs full grid\ngrid: {report['grid']['trials']} trials, {report['grid']['trial_epochs']} "
              f"trial-epochs, {report['grid']['wall_seconds']:.0f} s; ASHA: {s['stopped_early']} of {s['trials']} "
              f"trials stopped early, {s['trial_epochs']} trial-epochs ({100 * s['trial_epochs_saved']:.0f}% fewer), "
              f"{s['wall_seconds']:.0f} s ({100 * s['wall_saved']:.0f}% less wall time); same best config: "
              f"{s['same_best_overall']} (grid {s['grid_best']}, ASHA {s['asha_best']})")
        print(f"best per draw: grid {s['best_per_draw_grid']} / ASHA {s['best_per_draw_asha']}")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
