"""`forgetless tune`: a Ray Tune search over pre-training stop points, learning rates and searchable fields."""
from __future__ import annotations

import argparse
import json

from forgetless.commands import add_config_args
from forgetless.console import say, stdout_kept_for_results
from forgetless.platform.tuning import SearchResult, run_search


def print_search(res: SearchResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"name": res.name, "objective": res.objective, "best": res.best.__dict__ if res.best else None,
                          "trial_epochs": res.trial_epochs, "parent_run_id": res.parent_run_id,
                          "pareto_front": res.pareto().records(), "edge_warnings": res.edge_warnings(),
                          "trials": [t.__dict__ for t in res.trials]}, indent=1, default=str))
        return
    print()
    print(res.table())
    print()
    b = res.best
    if res.multi_objective:
        print_front(res)
    elif b is not None:
        shown = ", ".join(f"{k}={v}" for k, v in b.params.items())
        test = b.metrics.get("test/target/acc")
        print(f"best: {shown}  (objective {b.objective:.4f}"
              + (f", target test accuracy {100 * test:.1f}%" if test is not None else "") + ")")
        sets = " ".join(f"--set {k if not k.startswith('strategy.') else 'strategies.0.params.' + k[9:]}={v}"
                        for k, v in b.params.items() if k != "stop_point")
        print(f"its config: {sets or '(the base config)'}, initialised from stop point epoch {b.stop_point}")
    print(f"{len(res.trials)} trials, {res.trial_epochs} trial-epochs"
          + (f", {res.wall_seconds:.0f} s" if res.wall_seconds else ""))
    say(f"MLflow parent run {res.parent_run_id} in {res.tracking_uri} (table and plots among its artifacts); "
        f"rebuild them with: forgetless report {res.parent_run_id}")


def print_front(res: SearchResult) -> None:
    """A Pareto search's answer: each front point, its values and its numbers (validation: chosen on; test)."""
    front = res.pareto()
    print(f"Pareto front ({len(front)} trials, chosen on validation; test numbers reported):")
    for t in front.trials:
        shown = ", ".join(f"{k}={v}" for k, v in t.params.items())
        numbers = ", ".join(f"{m} {100 * t.metrics.get(f'val/{m}', float('nan')):.1f}% val / "
                            f"{100 * t.metrics.get(f'test/{m}', float('nan')):.1f}% test" for m, _ in front.trade_off)
        print(f"  {t.trial_id}: {shown}  ({numbers})")


def cmd_tune(args: argparse.Namespace) -> int:
    with stdout_kept_for_results(args.json):
        res = run_search(args.config, resume=args.resume, overrides=args.overrides)
    print_search(res, args.json)
    return 0


def register(sub) -> None:
    p = sub.add_parser("tune", help="search pre-training stop points x learning rates with Ray Tune",
                       description="Pre-train the source once (or reuse an identical trajectory), then run the "
                                   "config's `search:` section as a Ray Tune search: one Ray Train + DeepSpeed "
                                   "fine-tuning run per trial, grid / random / optuna search, optional ASHA early "
                                   "stopping. One MLflow parent run per search, one child run per trial. "
                                   "See docs/tune.md.")
    add_config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="finish a search that was interrupted: finished trials are kept, unfinished ones continue "
                        "from their last checkpoint")
    p.add_argument("--json", action="store_true", help="print results as JSON instead of a table")
    p.set_defaults(func=cmd_tune)
