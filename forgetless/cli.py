"""The `forgetless` command. Subcommands live in `forgetless/commands/`, one module each, discovered automatically:
each module defines `register(subparsers)`."""
from __future__ import annotations

import argparse
import atexit
import importlib
import os
import pkgutil
import sys
import threading

import forgetless.commands as commands
from forgetless.console import DASHBOARD_VARIABLE, VERBOSE_VARIABLE
from forgetless.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forgetless",
        description="Fine-tune pretrained backbones on new tasks without forgetting, on Ray Train + DeepSpeed, "
                    "tracked in MLflow.",
        epilog="Run `forgetless COMMAND --help` for a command's options. Docs: README.md.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show Ray Train's per-checkpoint lines, DeepSpeed's op loading and known-harmless "
                             "library warnings from the workers (off by default)")
    parser.add_argument("--ray-dashboard", action="store_true",
                        help="start Ray's dashboard (and Ray's metrics) with the embedded local cluster; off by "
                             "default, as it costs CPU a 2-core machine needs for training (same as "
                             "FORGETLESS_RAY_DASHBOARD=1). A cluster of your own keeps its own dashboard")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not mod.name.startswith("_"):
            importlib.import_module(f"forgetless.commands.{mod.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_VARIABLE] = "1"  # read by the driver and passed on to the workers (ray_cluster.init_ray)
    if args.ray_dashboard:
        os.environ[DASHBOARD_VARIABLE] = "1"  # read by ray_cluster.init_ray
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        # One line per error, whatever a library put into the message (a YAML snippet, a pydantic table).
        print(f"forgetless: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("forgetless: interrupted; the last checkpoint and the MLflow run are kept — re-run the same command "
              "to resume", file=sys.stderr)
        return 130


def entry(argv: list[str] | None = None) -> None:
    """The `forgetless` executable: `main`, then the process ends without the interpreter's own teardown. That
    teardown frees every module (torch, Ray, MLflow, DeepSpeed) one by one, ~1.6 s on a 2-core machine after the last
    line is printed, for a process that is about to end anyway. What an exit must still do is done first: the
    atexit handlers (Ray's shutdown of an embedded cluster, MLflow's and logging's flushes) and the streams' flush.
    Where a thread other than the main one still runs (not a daemon), the normal exit waits for it as always."""
    code = main(argv)
    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()  # CPython's own exit step (private name, public behaviour: the handlers, in order)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
