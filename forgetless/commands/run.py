"""`forgetless run` and `forgetless compare`."""
from __future__ import annotations

import argparse
import json

from forgetless.commands import add_config_args, add_repeat_args, repeat_overrides
from forgetless.config import load_config, select_strategy
from forgetless.console import say, stdout_kept_for_results
from forgetless.platform.tracking import run_descriptions as review
from forgetless.platform.driver.runner import execute


def _print_result(out, as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"label": r.label, "seed": r.seed, "metrics": r.metrics, "R": r.accuracy_matrix.tolist(),
                           "mlflow_run_id": r.mlflow_run_id, "pareto": rec["pareto"]}  # docs/protocol.md
                          for r, rec in zip(out.results, out.records())], indent=1))
        return
    print()
    print(out.table())
    print()
    several = len(out.seeds) > 1
    for r in out.results:
        names = r.task_names
        print(f"{r.run_label(several)}: accuracy matrix (rows: before, after {', after '.join(names[1:])}; "
              f"columns: {', '.join(names)})")
        for row in r.accuracy_matrix:
            print("   " + "  ".join(f"{v:.3f}" for v in row))
    say(f"MLflow parent run {out.parent_run_id} in {out.tracking_uri}")
    link = review.ui_link(out.tracking_uri, out.experiment_id, out.parent_run_id)
    if out.tracking_uri.startswith(("http://", "https://")):
        say(f"review it: {link}")
    else:
        say(f"review it: mlflow ui --backend-store-uri {out.tracking_uri}   then open {link}")
    say(f"offline report: forgetless report {out.parent_run_id} --html; register a model: forgetless register "
        f"{out.parent_run_id} --strategy LABEL")


def cmd_run(args: argparse.Namespace) -> int:
    cfg = select_strategy(load_config(args.config, args.overrides + repeat_overrides(args)), args.strategy)
    with stdout_kept_for_results(args.json):
        out = execute(cfg, "run")
    _print_result(out, args.json)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides + repeat_overrides(args))
    with stdout_kept_for_results(args.json):
        out = execute(cfg, "compare")
    _print_result(out, args.json)
    return 0


def register(sub) -> None:
    p = sub.add_parser("run", help="transfer under one strategy (pre-training the source first if needed)",
                       description="Pre-train the source task (or reuse an identical earlier pre-training), then "
                                   "train the target task(s) under one strategy on Ray Train + DeepSpeed. Re-running "
                                   "the same config resumes from the latest checkpoint.")
    add_config_args(p)
    p.add_argument("--strategy", help="which strategy of the config to run (or any registered strategy name)")
    add_repeat_args(p)
    p.add_argument("--json", action="store_true", help="print results as JSON instead of a table")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="run every strategy of the config on the same stream and compare",
                       description="Run every strategy listed in the config from the same pre-trained checkpoint "
                                   "and print a comparison table (target accuracy, source accuracy before/after, "
                                   "forgetting, steps to 90% of the best target accuracy, wall time).")
    add_config_args(p)
    add_repeat_args(p)
    p.add_argument("--json", action="store_true", help="print results as JSON instead of a table")
    p.set_defaults(func=cmd_compare)
