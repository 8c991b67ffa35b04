"""The `forgetless` command. Subcommands live in `forgetless/commands/`, one module each, discovered automatically:
each module defines `register(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import signal
import sys
import threading

import forgetless.commands as commands
from forgetless._compat import cpython
from forgetless.console import DASHBOARD_VARIABLE, VERBOSE_VARIABLE
from forgetless.errors import ConfigError, RunFailed


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
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _sigterm_as_sigint) if main_thread else None
    try:
        return _run_command(args)
    finally:
        if previous is not None:  # (main() called in-process, e.g. by a test: the caller's handler back)
            signal.signal(signal.SIGTERM, previous)


def _run_command(args: argparse.Namespace) -> int:
    """The command's exit code; a ConfigError, a worker's failure or an interrupt as one line."""
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        # One line per error, whatever a library put into the message (a YAML snippet, a pydantic table).
        print(f"forgetless: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except RunFailed as e:  # a worker's failure: one line naming the run, the worker and the run's failure.log
        print(f"forgetless: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("forgetless: interrupted; the last checkpoint and the MLflow run are kept — re-run the same command "
              "to resume", file=sys.stderr)
        return 130


def _sigterm_as_sigint(signum, frame) -> None:
    """`ray job stop` / `forgetless jobs stop` send SIGTERM, and a stop should end the run the way Ctrl-C does: during a
    fit Ray Train's SIGINT handler aborts the run gracefully (its registered checkpoints kept, so the same command
    resumes), elsewhere Python raises KeyboardInterrupt; either way the MLflow parent run is marked KILLED
    (tracking.end_status). The command's behaviour only: the Python API leaves the caller's handlers alone."""
    signal.raise_signal(signal.SIGINT)


def entry(argv: list[str] | None = None) -> None:
    """The `forgetless` executable: `main`, then the process ends without the interpreter's own teardown. That
    teardown frees every module (torch, Ray, MLflow, DeepSpeed) one by one, ~1.6 s on a 2-core machine after the last
    line is printed, for a process that is about to end anyway. What an exit must still do is done first: the
    atexit handlers (Ray's shutdown of an embedded cluster, MLflow's and logging's flushes) and the streams' flush.
    On CPython's public path (_compat/cpython.py) the process exits the normal way.
    Where a thread other than the main one still runs (not a daemon), the normal exit waits for it as always."""
    code = main(argv)
    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    if not cpython.run_exit_handlers():  # CPython's own exit step (a private name: _compat/cpython.py)
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
