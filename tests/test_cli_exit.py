"""The `forgetless` executable (`cli.entry`) ends its process without the interpreter's teardown, but only after what
an exit must do: the atexit handlers (Ray's shutdown of the embedded cluster among them) run, and a running
non-daemon thread is waited for as in a normal exit. It runs in a child process, as the executable does. (An embedded
cluster's processes also end with the driver without its shutdown: Ray starts them to die with their parent, so the
cluster's end cannot tell whether the handlers ran; a handler of the test's own does.)"""
from __future__ import annotations

import subprocess
import sys
import textwrap


def _child(script: str, cwd, timeout_s: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout_s)


def test_exit_code_atexit_handlers_and_running_threads_are_kept(tmp_path):
    done = _child("""
        import atexit, pathlib, threading, time
        from forgetless import cli
        atexit.register(lambda: pathlib.Path("atexit-ran").write_text("yes"))
        def late():
            time.sleep(1.0)
            pathlib.Path("thread-finished").write_text("yes")
        threading.Thread(target=late).start()  # not a daemon: a normal exit waits for it
        cli.entry(["compare", "missing.yaml"])
        """, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "forgetless: error:" in done.stderr
    assert (tmp_path / "atexit-ran").read_text() == "yes"
    assert (tmp_path / "thread-finished").read_text() == "yes"
