"""`forgetless submit`: run an experiment on a Ray cluster as a Ray Job."""
from __future__ import annotations

import argparse

from forgetless.commands import add_config_args
from forgetless.console import say
from forgetless.platform.driver import jobs


def cmd_submit(args: argparse.Namespace) -> int:
    extra = list(args.extra)
    client, sub = jobs.submit(args.config, args.overrides, args.address, command=args.command, extra_args=extra,
                              working_dir=args.working_dir, ship_code=not args.no_ship_code,
                              forward_credentials=not args.no_forward_credentials, extra_env=args.env,
                              local_checks=not args.skip_local_checks)
    print(sub.submission_id)
    if not args.follow:
        say(f"follow it: forgetless jobs logs {sub.submission_id} --follow --address "
            f"{jobs.resolve_address(args.address)}")
        return 0
    status = jobs.follow(client, sub.submission_id)
    say(f"job {sub.submission_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def register(sub) -> None:
    p = sub.add_parser(
        "submit", help="submit run/compare/tune to a Ray cluster as a Ray Job",
        description="Check the config, the cluster, the storage and the MLflow server from here, then submit "
                    "`forgetless COMMAND CONFIG` as a Ray Job (working dir uploaded, AWS_* and MLFLOW_* variables "
                    "passed to it, values never printed). The submission id is deterministic: resubmitting the same "
                    "config resumes from its checkpoints. See cluster/README.md.")
    add_config_args(p)
    p.add_argument("--address", help="Ray dashboard address of the head, e.g. http://HEAD:8265 (default: "
                                     "$RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")
    p.add_argument("--command", default="compare", choices=["run", "compare", "tune"],
                   help="what the job runs (default: compare)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 only if it "
                                                        "succeeded")
    p.add_argument("--working-dir", help="folder uploaded as the job's working dir; must contain CONFIG "
                                         "(default: the current folder)")
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="also pass this environment variable to the job (repeatable)")
    p.add_argument("--no-forward-credentials", action="store_true",
                   help="do not pass AWS/MLflow keys or tokens (the cluster has its own: instance profile, IRSA)")
    p.add_argument("--no-ship-code", action="store_true",
                   help="use the forgetless installed on the cluster instead of uploading this one")
    p.add_argument("--skip-local-checks", action="store_true",
                   help="do not check storage / MLflow / data from this machine (when only the cluster can reach "
                        "them); the job still checks them at its start")
    p.add_argument("extra", nargs="*", metavar="-- ARGS",
                   help="after `--`: arguments for the command, e.g. -- --strategy finetune")
    p.set_defaults(func=cmd_submit)
