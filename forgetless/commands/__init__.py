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


def add_repeat_args(p: argparse.ArgumentParser) -> None:
    """Seeds and concurrency of the strategy runs (run, compare): they become config overrides, so YAML, --set and
    these flags mean the same."""
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="repeat every strategy (and the pre-training) once per seed; the table shows mean ± sd and n "
                        "(same as `seeds: [0, 1, 2]` in the YAML)")
    p.add_argument("--max-concurrent", type=int, metavar="N",
                   help="strategy runs at once where the cluster has room (default: as many as fit; 1: one after "
                        "another; same as scaling.max_concurrent)")


def repeat_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if args.seeds:
        out.append(f"seeds=[{', '.join(map(str, args.seeds))}]")
    if args.max_concurrent is not None:
        out.append(f"scaling.max_concurrent={args.max_concurrent}")
    return out
