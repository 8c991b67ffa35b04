"""The watcher next to an embedded cluster (process_lifetime.py) and the stale-run check (tracking.driver_alive) tell a
live driver from a gone one by its start, and that must hold when the wall clock steps: psutil's create_time moves
with the wall clock, and a CI run once had live clusters ended mid-run by their own watchers ("GCS server received
SIGTERM"). The clock step is simulated by shifting psutil's boot time (the system clock cannot be stepped here)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from forgetless import process_lifetime as reaper

from forgetless.platform.tracking import mlflow_runs as tracking

LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the clock-step case is Linux's /proc")


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f}s waiting for {what}"
        time.sleep(0.2)


@LINUX_ONLY
def test_a_live_driver_stays_alive_when_the_wall_clock_steps(monkeypatch):
    me = os.getpid()
    token, identity = reaper.started_token(me), tracking.driver_identity()
    before = psutil.Process(me).create_time()
    real_boot_time = psutil._pslinux.boot_time
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: real_boot_time() + 3600.0)
    # the simulated step is real for psutil: the start time it reports moved by an hour ...
    assert psutil.Process(me).create_time() == pytest.approx(before + 3600.0, abs=1.0)
    # ... and this process is still the one its token and its MLflow driver tag name
    assert reaper.started_token(me) == token and reaper.alive(me, token)
    assert tracking.driver_alive(identity) is True


def test_an_ended_process_is_not_alive_even_before_it_is_collected():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        token = reaper.started_token(child.pid)
        assert reaper.alive(child.pid, token) and token != reaper.started_token(os.getpid())
        assert tracking.driver_alive(tracking.driver_identity(child.pid)) is True
        child.kill()
        # not waited for yet: a zombie, whose /proc entry is still there
        wait_for(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, 30, "the child to die")
        assert not reaper.alive(child.pid, token)
        assert tracking.driver_alive(f"{tracking.driver_identity().split(':')[0]}:{child.pid}:{token}") is False
    finally:
        child.kill()
        child.wait(timeout=30)
    assert not reaper.alive(child.pid, token)
    assert tracking.driver_alive("some-other-host:1:ticks:1") is None  # another host's driver cannot be checked


def test_the_watcher_ends_a_sessions_processes_only_once_its_driver_is_gone():
    session = f"session_reaper_test_{uuid.uuid4().hex}"
    # a stand-in for a Ray process of that session (Ray's processes name their session on the command line)
    member = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", session], start_new_session=True)
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    watcher = subprocess.Popen([sys.executable, reaper.__file__, str(driver.pid), reaper.started_token(driver.pid),
                                session])
    try:
        time.sleep(4 * reaper.POLL_S)  # several polls while the driver lives
        assert member.poll() is None and watcher.poll() is None, "the watcher ended a live driver's session"
        driver.send_signal(signal.SIGKILL)  # left a zombie: the watcher must not wait for it to be collected
        wait_for(lambda: member.poll() is not None, 30, "the watcher to end the session's process")
        assert member.returncode == -signal.SIGTERM
        assert watcher.wait(timeout=30) == 0
    finally:
        for proc in (member, driver, watcher):
            proc.kill()
            proc.wait(timeout=30)
