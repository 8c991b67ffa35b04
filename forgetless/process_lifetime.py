"""Ray processes of an embedded cluster end with the driver that started them, even when it is killed (SIGKILL).

A driver that ends normally shuts its cluster down. A killed one cannot, and Ray's helper processes (GCS, raylet,
dashboard, idle workers) then stay alive for minutes. So next to every embedded cluster a small watcher process runs
(`python .../forgetless/process_lifetime.py DRIVER_PID DRIVER_STARTED SESSION_NAME`: this file run as a script, so
it imports psutil only, not forgetless with torch and Ray; in its own session, so a signal to the driver's process
group does not reach it): once the driver is gone it ends every process of that Ray session (their
command lines carry the session's name; other clusters on the machine have other names) and exits.

"Gone" is told by `started_token`, which must not move while the process lives: psutil's `create_time()` is the
process's clock ticks since boot *plus the boot time, re-read from the wall clock on every call*, so a step of the wall
clock (NTP, a VM resumed from a snapshot) changed it and a watcher took a live driver for a dead one and ended its
cluster mid-run (seen in CI: "GCS server received SIGTERM").
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

POLL_S = 1.0
GRACE_S = 5.0


def started_token(pid: int) -> str:
    """When process `pid` started, as a string that stays the same for its whole life and differs for a later process
    given the same pid. On Linux: its start in clock ticks since boot (/proc/PID/stat field 22), which no change of
    the wall clock moves. Elsewhere psutil's create_time is the kernel's own record of the start (not re-derived from
    the boot time). Raises psutil.NoSuchProcess when there is no such process."""
    if sys.platform.startswith("linux"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError) as gone:
            raise psutil.NoSuchProcess(pid) from gone
        # the command name (field 2) is in parentheses and may hold spaces or ")": count fields after the last ")"
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):  # a zombie has ended; only its parent has not collected its exit status yet
            raise psutil.NoSuchProcess(pid)
        return "ticks:" + fields[19]
    return f"{psutil.Process(pid).create_time():.2f}"


def start(session_name: str) -> subprocess.Popen:
    """Watch this process: when it is gone, end the processes of Ray session `session_name`."""
    me = os.getpid()
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(me), started_token(me), session_name],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def alive(pid: int, started: str) -> bool:
    """Whether process `pid` is the one that `started_token` described as `started`."""
    try:
        return started_token(pid) == started
    except psutil.NoSuchProcess:
        return False


def session_processes(session_name: str) -> list[psutil.Process]:
    """The session's processes (GCS, raylet, dashboard, agents: their command lines name the session) and their
    descendants (Ray's workers rename their process title to `ray::...`, so only their parentage tells)."""
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid != os.getpid() and any(session_name in arg for arg in (p.info["cmdline"] or [])):
            found[p.pid] = p
            try:
                found.update((c.pid, c) for c in p.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
    found.pop(os.getpid(), None)
    return list(found.values())


def end_session(session_name: str) -> int:
    """SIGTERM every process of the session, SIGKILL what is left after GRACE_S; returns how many there were."""
    procs = session_processes(session_name)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(procs, timeout=GRACE_S)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return len(procs)


def main(argv: list[str]) -> int:
    pid, started, session_name = int(argv[0]), argv[1], argv[2]
    while alive(pid, started):
        time.sleep(POLL_S)
    end_session(session_name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
