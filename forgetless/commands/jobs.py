"""`forgetless jobs list|status|logs|stop`: the Ray Jobs of a cluster."""
from __future__ import annotations

import argparse
import json

from forgetless.console import say
from forgetless.errors import ConfigError
from forgetless.platform.driver import jobs


def cmd_jobs(args: argparse.Namespace) -> int:
    client = jobs.connect(args.address)
    if args.action == "list":
        rows = jobs.list_jobs(client, all_jobs=args.all)
        if args.json:
            print(json.dumps(rows, indent=1))
        for r in [] if args.json else rows:
            print(f"{r['submission_id']:60s} {r['status']:10s} {r['config']}")
        return 0
    if not args.job_id:
        raise ConfigError(f"jobs {args.action}: give a submission id (see `forgetless jobs list`)")
    if args.action == "status":
        info = jobs.describe(client, args.job_id)
        print(json.dumps(info, indent=1) if args.json else f"{info['submission_id']}: {info['status']}"
              + (f" ({info['message']})" if info["message"] else "")
              + (f"\n  resumes the earlier job {info['resumes']}" if info["resumes"] else "")
              + "".join(f"\n  resized {r}" for r in info["resizes"])
              + (f"\n  STALLED: {info['stalled']}" if info["stalled"] else ""))
        return 0
    if args.action == "logs":
        if args.follow:
            status = jobs.follow(client, args.job_id)
            say(f"job {args.job_id}: {status}")
            return 0 if status == "SUCCEEDED" else 1
        jobs.status_of(client, args.job_id)  # a clear error for an unknown id
        print(client.get_job_logs(args.job_id), end="")
        return 0
    # stop
    jobs.status_of(client, args.job_id)
    stopped = client.stop_job(args.job_id)
    say(f"job {args.job_id}: {'stop requested' if stopped else 'already ended'}; its last checkpoint is kept "
        f"-- resubmit the same config to resume (under the same MLflow parent run)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("jobs", help="list, inspect, follow or stop Ray Jobs submitted with `forgetless submit`",
                       description="Manage the Ray Jobs of a cluster (the Jobs API of its head).")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?", help="submission id (printed by `forgetless submit`)")
    p.add_argument("--address", help="Ray dashboard address of the head, e.g. http://HEAD:8265 (default: "
                                     "$RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    p.add_argument("--all", action="store_true", help="list: also jobs not submitted by forgetless")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_jobs)
