"""`forgetless register`: put a strategy's logged model in the MLflow model registry, with an alias."""
from __future__ import annotations

import argparse

from forgetless.commands import add_tracking_uri_arg
from forgetless.console import say
from forgetless.platform.tracking import model_export
from forgetless.platform.tracking import mlflow_runs as tracking


def cmd_register(args: argparse.Namespace) -> int:
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_reachable(uri)
    name, version, label = model_export.register_strategy_model(uri, args.run_id, args.strategy, args.name,
                                                                args.alias)
    print(f"models:/{name}@{args.alias}")
    say(f"registered {label}'s model as {name} version {version}, alias {args.alias!r}; its forgetting metrics are "
        f"the version's tags")
    return 0


def register(sub) -> None:
    p = sub.add_parser("register", help="register a strategy's model in the MLflow model registry with an alias",
                       description="Register the model a strategy's run logged (tracking.log_model: true) in the "
                                   "MLflow model registry, point an alias (default: champion) at the new version and "
                                   "tag it with the run's forgetting and learning metrics. Load it with "
                                   "mlflow.pytorch.load_model('models:/NAME@ALIAS').")
    p.add_argument("run_id", help="the parent run of `forgetless compare` (with --strategy) or a strategy's run")
    p.add_argument("--strategy", help="which strategy of the comparison (its label, e.g. lp_ft)")
    p.add_argument("--name", help="registered model name (default: the strategy's label)")
    p.add_argument("--alias", default="champion", help="alias of the new version (default: champion)")
    add_tracking_uri_arg(p)
    p.set_defaults(func=cmd_register)
