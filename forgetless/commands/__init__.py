"""CLI subcommands: one module per command, each with `register(subparsers)`."""
from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (see examples/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, value parsed as YAML; repeatable "
                        "(e.g. --set train.epochs=3 --set deepspeed.zero_stage=3)")


def add_tracking_uri_arg(p: argparse.ArgumentParser) -> None:
    """For commands that read runs back from MLflow (report, register)."""
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
