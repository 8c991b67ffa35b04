"""Real server processes for the fault tests: an MLflow tracking server that can be stopped and started again on the
same port and database (an outage), each wait bounded and saying what it waits for."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import MLFLOW_SERVER_ENV
from forgetless.platform.driver.ports import free_port  # noqa: F401 (tests import it from here)

BIN = Path(sys.executable).parent


def wait_until(what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what} within {timeout:.0f}s")


class MlflowServer:
    """`mlflow server` on 127.0.0.1:port with a SQLite store in `folder`; stop() and start() again make an outage."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> "MlflowServer":
        log = (self.folder / "mlflow-server.log").open("a")
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--default-artifact-root", (self.folder / "artifacts").as_uri()],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.folder,
            env={**os.environ, **MLFLOW_SERVER_ENV})
        wait_until(f"the MLflow server on port {self.port} answering /health (log: {self.folder}/mlflow-server.log)",
                   self.healthy, timeout)
        return self

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"the MLflow server exited with {self.proc.returncode}; see "
                               f"{self.folder}/mlflow-server.log")
        with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
            return r.status == 200

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout)
        except ProcessLookupError:
            pass
        self.proc = None
