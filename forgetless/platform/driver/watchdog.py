"""The driver's watch over one Ray Train run: it says when the run makes no progress, and keeps the run's wall time.

Progress is a new or changed file in the run's storage folder (a checkpoint, its state): every worker writes one per
epoch. When nothing changes for FORGETLESS_NO_PROGRESS_S seconds (default 900) the driver says so, with what the run
may be waiting for; `forgetless jobs status` shows the same line from the job's log (jobs.stall_of). The wall time of
every invocation of the run is written to `driver_wall.json` as it goes (every FORGETLESS_WATCH_EVERY_S, default
30 s), so the time of an invocation that was killed still counts, give or take one interval.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

from forgetless import storage
from forgetless.console import say

NO_PROGRESS_PREFIX = "no progress"  # the line `jobs status` looks for in a job's log
PROGRESS_AGAIN_PREFIX = "progress again"


def _env_seconds(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


class WallClock:
    """`driver_wall.json` of a run: the seconds of each invocation, the current one updated as it runs."""

    def __init__(self, wall_uri: str):
        self.uri = wall_uri
        previous = json.loads(storage.read_bytes(wall_uri)) if storage.exists(wall_uri) else {}
        # files written before invocations were recorded hold only the total
        self.previous = previous.get("invocations") or ([previous["wall_seconds"]] if "wall_seconds" in previous
                                                        else [])
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def total(self) -> float:
        return sum(self.previous) + self.elapsed()

    def write(self, finished: bool = False) -> float:
        invocations = [*self.previous, self.elapsed()]
        storage.write_bytes(self.uri, json.dumps({"wall_seconds": sum(invocations), "invocations": invocations,
                                                  "finished": finished}).encode())
        return sum(invocations)


def latest_change(run_uri: str) -> float | None:
    """Newest modification time (seconds since the epoch) of anything in the run's storage folder."""
    if storage.is_s3(run_uri):
        bucket, prefix = storage.split_s3(run_uri)
        newest = None
        pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
        for page in pages:
            for obj in page.get("Contents", []):
                t = obj["LastModified"].timestamp()
                newest = t if newest is None or t > newest else newest
        return newest
    root = Path(run_uri)
    if not root.exists():
        return None
    return max((p.stat().st_mtime for p in [root, *root.rglob("*")] if p.exists()), default=None)


class RunWatch:
    """A daemon thread for the duration of one fit (use as a context manager)."""

    def __init__(self, run_name: str, run_uri: str, wall: WallClock, hints: Callable[[], str] = lambda: ""):
        self.run_name, self.run_uri, self.wall = run_name, run_uri, wall
        self.hints = hints  # what a stalled run may be waiting for, said with the warning
        self.limit = _env_seconds("FORGETLESS_NO_PROGRESS_S", 900)
        self.every = _env_seconds("FORGETLESS_WATCH_EVERY_S", 30)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"forgetless-watch-{run_name}", daemon=True)
        self.stalled = False

    def __enter__(self) -> "RunWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every + 30)

    def _hints(self) -> str:
        try:
            return self.hints()
        except Exception as e:  # noqa: BLE001 - a hint that cannot be had must not end the watch
            return f"(what it waits for could not be read: {e})"

    def _loop(self) -> None:
        last_seen, last_change_at = None, time.monotonic()
        while not self._stop.wait(self.every):
            try:
                self.wall.write()
                changed = latest_change(self.run_uri)
            except OSError as e:  # storage trouble is reported by the run itself; the watch only watches
                say(f"watch of {self.run_name}: cannot read {self.run_uri} ({e})")
                continue
            if changed != last_seen:
                last_seen, last_change_at = changed, time.monotonic()
                if self.stalled:
                    self.stalled = False
                    say(f"{PROGRESS_AGAIN_PREFIX} in Ray Train run {self.run_name}")
            elif not self.stalled and time.monotonic() - last_change_at >= self.limit:
                self.stalled = True
                say(f"{NO_PROGRESS_PREFIX} for {time.monotonic() - last_change_at:.0f}s in Ray Train run "
                    f"{self.run_name}: nothing new in {self.run_uri}. {self._hints()} (this warning: "
                    f"FORGETLESS_NO_PROGRESS_S={self.limit:g})")
