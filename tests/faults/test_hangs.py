"""Nothing waits silently or forever: a DeepSpeed op build lock left by a killed build is named, with its path and
the fix, within a bound (torch itself would wait on it forever in FileBaton.wait); a lock of a build that is still
running is waited for; a run that makes no progress says so, and `jobs status` shows it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from forgetless.errors import ConfigError
from forgetless.platform.worker import op_builds as build_locks
from forgetless.platform.driver import jobs
from forgetless.platform.driver import watchdog
from forgetless.platform.driver.watchdog import RunWatch, WallClock

from .fault_servers import wait_until


def _lock(root: Path, age_s: float = 0.0) -> Path:
    lock = root / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    if age_s:
        t = time.time() - age_s
        os.utime(lock, (t, t))
    return lock


@pytest.fixture
def extensions_dir(tmp_path, monkeypatch):
    """A TORCH_EXTENSIONS_DIR of the test's own: the environment's real one is shared with every other run."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    return tmp_path / "torch_extensions"


def test_a_stale_build_lock_is_named_with_its_path_and_the_fix(extensions_dir):
    lock = _lock(extensions_dir, age_s=3600)  # an hour old: no build takes that long
    with pytest.raises(ConfigError) as e:
        build_locks.wait_for_build_locks(timeout=300)  # stale at once: no waiting
    assert str(lock) in str(e.value) and f"rm {lock}" in str(e.value)


def test_a_running_build_is_waited_for_and_a_lock_that_stays_ends_the_wait(extensions_dir, monkeypatch):
    lock = _lock(extensions_dir)
    threading.Timer(1.0, lock.unlink).start()  # the build finishes: its lock goes
    build_locks.wait_for_build_locks(timeout=120, poll=0.1)
    assert not lock.exists()
    lock = _lock(extensions_dir.parent / "other")  # a build that never ends its lock
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions_dir.parent / "other"))
    with pytest.raises(ConfigError, match="build lock .*lock is [0-9]+s old"):
        build_locks.wait_for_build_locks(timeout=2, poll=0.1)


def test_ops_are_built_by_the_environments_own_ninja(monkeypatch, extensions_dir):
    """Whichever shell a process starts from, torch finds this environment's ninja first: two ninja versions record
    a build under different hashes, and each would rebuild the op the other built (1-2 minutes in a worker's start)."""
    own = Path(sys.executable).parent
    if not (own / "ninja").is_file():
        pytest.skip("this environment has no ninja of its own (DeepSpeed's pip dependency)")
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))  # a shell without the environment activated
    build_locks.use_private_extensions_dir()
    assert Path(shutil.which("ninja")) == own / "ninja"
    path = os.environ["PATH"]
    build_locks.use_environment_ninja()
    assert os.environ["PATH"] == path  # once is enough: no growing PATH


def test_the_cli_names_a_stale_lock_before_ray_starts(extensions_dir, workdir, tiny_config):
    """The real command on the embedded default: one line, exit 2, within a bound a hang would break."""
    import yaml

    lock = _lock(extensions_dir, age_s=3600)
    Path("tiny.yaml").write_text(yaml.safe_dump(tiny_config()))
    out = subprocess.run([str(Path(sys.executable).parent / "forgetless"), "compare", "tiny.yaml"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("forgetless: error:")]
    assert len(errors) == 1 and str(lock) in errors[0] and "starting Ray" not in out.stderr


def test_a_run_without_progress_says_so_and_jobs_status_shows_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FORGETLESS_NO_PROGRESS_S", "1")
    monkeypatch.setenv("FORGETLESS_WATCH_EVERY_S", "0.2")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    said: list[str] = []

    def console_has(text: str) -> bool:
        said.append(capsys.readouterr().err)
        return text in "".join(said)

    clock = WallClock(str(tmp_path / "driver_wall.json"))
    with RunWatch("tiny-finetune-x", str(run_dir), clock, lambda: "Free CPUs in the Ray cluster: 0."):
        wait_until("the no-progress warning on the console", lambda: console_has("no progress for"), 60)
        (run_dir / "checkpoint_e0001").mkdir()  # a checkpoint: progress again
        wait_until("the progress-again line on the console", lambda: console_has("progress again"), 60)
    warning = next(line for line in "".join(said).splitlines() if "no progress for" in line)
    assert "tiny-finetune-x" in warning and "Free CPUs in the Ray cluster: 0." in warning
    assert str(run_dir) in warning
    # `forgetless jobs status` reads the same lines from the job's log
    log = "[forgetless] strategy finetune: Ray Train run tiny-finetune-x\n" + warning + "\n"
    assert jobs.stall_of(log) == warning.partition("[forgetless] ")[2]
    assert jobs.stall_of(log + "[forgetless] progress again in Ray Train run tiny-finetune-x\n") is None
    # the watch also kept the invocation's wall time on disk as it ran
    assert watchdog.WallClock(str(tmp_path / "driver_wall.json")).previous[0] > 0


@pytest.mark.e2e
@pytest.mark.slow
def test_another_ray_cluster_on_the_machine_changes_nothing(workdir, tiny_config, tmp_path):
    """An embedded run tells everything it starts its own cluster's address: with a second cluster running, no
    "Found multiple active Ray instances" from Ray Train's helpers, and the run succeeds."""
    import signal

    import yaml

    from .fault_servers import free_port

    temp_dir = Path(tempfile.mkdtemp(prefix="flother-", dir="/tmp"))  # short: Ray's Unix sockets live under it
    log = (tmp_path / "other-ray.log").open("w")
    other = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                              "--port", str(free_port()), "--num-cpus", "0", "--include-dashboard", "false",
                              "--temp-dir", str(temp_dir), "--disable-usage-stats"],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, "RAY_ADDRESS": ""})
    try:
        wait_until("the other Ray cluster's GCS process", lambda: other.poll() is None and any(
            "gcs_server" in " ".join(p.cmdline()) and str(temp_dir) in " ".join(p.cmdline())
            for p in psutil.process_iter()), 180)
        Path("tiny.yaml").write_text(yaml.safe_dump(tiny_config()))
        out = subprocess.run([str(Path(sys.executable).parent / "forgetless"), "compare", "tiny.yaml"],
                             capture_output=True, text=True, timeout=1500, env={**os.environ, "RAY_ADDRESS": ""})
        assert out.returncode == 0, out.stderr[-4000:]
        assert "Found multiple active Ray instances" not in out.stdout + out.stderr
    finally:
        os.killpg(other.pid, signal.SIGTERM)
        try:
            other.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(other.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
