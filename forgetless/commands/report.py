"""`forgetless report`: rebuild a finished search's result table and figures from MLflow."""
from __future__ import annotations

import argparse
from pathlib import Path

from forgetless.commands import add_tracking_uri_arg
from forgetless.commands.tune import print_search
from forgetless.console import say
from forgetless.platform.tracking import html_report as report_html
from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.tuning import load_search, log_search_summary


def cmd_report(args: argparse.Namespace) -> int:
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_reachable(uri)
    if args.html:
        return _comparison_report(args, uri)
    res = load_search(uri, args.run_id)
    out = Path(args.out or f"forgetless_report/{res.name}")
    files = log_search_summary(res, out_dir=out, log=args.log)
    print_search(res, args.json)
    say("wrote " + ", ".join(str(f) for f in files) + (" and logged them on the parent run" if args.log else ""))
    return 0


def _comparison_report(args: argparse.Namespace, uri: str) -> int:
    """`--html`: the self-contained HTML comparison report of a `forgetless compare` parent run."""
    view = report_html.load_comparison(uri, args.run_id)
    out = Path(args.out or f"forgetless_report/{view.name}")
    out.mkdir(parents=True, exist_ok=True)
    path = report_html.write_report(view, out / report_html.REPORT_FILE)
    if args.log:
        tracking.client(uri).log_artifact(args.run_id, str(path))
    if not args.json:
        print()
        print(report_html.format_view_table(view))
        print()
    say(f"wrote {path} (opens offline in a browser)" + (" and logged it on the parent run" if args.log else ""))
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="rebuild a search's table and plots, or a comparison's HTML report, from MLflow",
                       description="Read a finished `forgetless tune` search back from MLflow (its parent run and "
                                   "the trials' child runs) and rebuild the result table, the target-accuracy vs "
                                   "stop point figure and the stop point x learning rate heatmap. With --html and "
                                   "the parent run of `forgetless compare`: the comparison table and its "
                                   "self-contained HTML report.")
    p.add_argument("run_id", help="the MLflow parent run id (printed by forgetless tune / forgetless compare)")
    add_tracking_uri_arg(p)
    p.add_argument("--out", help="folder for the table and figures (default: forgetless_report/<search name>)")
    p.add_argument("--log", action="store_true", help="also log the rebuilt files on the parent run")
    p.add_argument("--json", action="store_true", help="print results as JSON instead of a table")
    p.add_argument("--html", action="store_true",
                   help="for the parent run of `forgetless compare`: write the self-contained HTML comparison report "
                        "(learning and source-retention curves, accuracy-matrix heatmaps, learning vs forgetting)")
    p.set_defaults(func=cmd_report)
