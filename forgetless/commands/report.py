"""`forgetless report`: rebuild a finished search's result table and figures from MLflow."""
from __future__ import annotations

import argparse
from pathlib import Path

from forgetless.commands.tune import print_search
from forgetless.console import say
from forgetless.platform import tracking
from forgetless.platform.tuning import load_search, log_search_summary


def cmd_report(args: argparse.Namespace) -> int:
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_reachable(uri)
    res = load_search(uri, args.run_id)
    out = Path(args.out or f"forgetless_report/{res.name}")
    files = log_search_summary(res, out_dir=out, log=args.log)
    print_search(res, args.json)
    say("wrote " + ", ".join(str(f) for f in files) + (" and logged them on the parent run" if args.log else ""))
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="rebuild a search's table and plots from MLflow",
                       description="Read a finished `forgetless tune` search back from MLflow (its parent run and "
                                   "the trials' child runs) and rebuild the result table, the target-accuracy vs "
                                   "stop point figure and the stop point x learning rate heatmap.")
    p.add_argument("run_id", help="the search's MLflow parent run id (printed by forgetless tune)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--out", help="folder for the table and figures (default: forgetless_report/<search name>)")
    p.add_argument("--log", action="store_true", help="also log the rebuilt files on the parent run")
    p.add_argument("--json", action="store_true", help="print results as JSON instead of a table")
    p.set_defaults(func=cmd_report)
