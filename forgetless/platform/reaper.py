"""Ray processes of an embedded cluster end with the driver that started them, even when it is killed (SIGKILL).

A driver that ends normally shuts its cluster down. A killed one cannot, and Ray's helper processes (GCS, raylet,
dashboard, idle workers) then stay alive for minutes. So next to every embedded cluster a small watcher process runs
(`python .../forgetless/platform/reaper.py DRIVER_PID DRIVER_START SESSION_NAME`: this file run as a script, so
it imports psutil only, not forgetless with torch and Ray; in its own session, so a signal to the driver's process
group does not reach it): once the driver is gone it ends every process of that Ray session (their
command lines carry the session's name; other clusters on the machine have other names) and exits.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

POLL_S = 1.0
GRACE_S = 5.0


def start(session_name: str) -> subprocess.Popen:
    """Watch this process: when it is gone, end the processes of Ray session `session_name`."""
    me = psutil.Process()
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(me.pid),
                             f"{me.create_time():.2f}", session_name],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def alive(pid: int, started: str) -> bool:
    try:
        return f"{psutil.Process(pid).create_time():.2f}" == started
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
