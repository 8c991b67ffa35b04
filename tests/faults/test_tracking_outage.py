"""An MLflow outage longer than the retry budget never stops training and loses no metric point: a real `mlflow
server` process is stopped while points are logged and started again (same port, same database), and every point
is counted in the run's history, each (metric, step) exactly once."""
from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from forgetless.platform.tracking import metric_buffer

from forgetless.platform.tracking import metric_logging
from forgetless.platform.tracking import mlflow_runs as tracking

from .fault_servers import MlflowServer

KEYS = ("val/target/acc", "val/source/acc", "train/loss")


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv(metric_buffer.BUFFER_ENV, str(tmp_path / "buffer"))
    monkeypatch.setenv("FORGETLESS_TRACKING_RETRIES", "1")  # a short budget: the outage outlasts it at once
    monkeypatch.setenv("FORGETLESS_TRACKING_RETRY_AFTER_S", "0")  # probe the server on every call
    monkeypatch.setattr(metric_logging, "_logged", {})
    monkeypatch.setattr(metric_logging, "_retry_after", {})
    srv = MlflowServer(tmp_path).start()
    yield srv
    srv.stop()


def _log_steps(uri: str, run_id: str, steps) -> None:
    for step in steps:
        tracking.log_metrics(uri, run_id, {k: step / 100 for k in KEYS}, step=step)


def _history(uri: str, run_id: str) -> dict[str, list[int]]:
    c = MlflowClient(uri)
    return {k: sorted(m.step for m in c.get_metric_history(run_id, k)) for k in KEYS}


def _new_run(uri: str) -> str:
    c = MlflowClient(uri)
    return c.create_run(c.create_experiment(f"outage-{time.time_ns()}")).info.run_id


def test_outage_buffers_on_disk_and_flushes_when_back_with_no_duplicates(server):
    run_id = _new_run(server.uri)
    _log_steps(server.uri, run_id, range(0, 5))
    server.stop()
    _log_steps(server.uri, run_id, range(5, 15))  # returns although the server is down: buffered on disk
    assert metric_buffer.count_pending(run_id) == 10 * len(KEYS)
    server.start()
    _log_steps(server.uri, run_id, range(15, 20))  # the first answer sends the buffer first
    assert metric_buffer.count_pending(run_id) == 0
    # a resumed run re-trains epochs and logs their steps again: skipped, the history keeps one point per step
    metric_logging._logged.clear()  # as in a new worker process
    _log_steps(server.uri, run_id, range(10, 20))
    assert _history(server.uri, run_id) == {k: list(range(20)) for k in KEYS}

    # an outage that lasts until the end of the invocation: the driver's final flush waits for the server (bounded)
    server.stop()
    _log_steps(server.uri, run_id, range(20, 28))
    assert metric_buffer.pending_runs(server.uri) == [run_id]
    assert tracking.flush_buffered(server.uri, wait_s=0) == 0  # still down: kept on disk, said so, nothing lost
    assert metric_buffer.count_pending(run_id) == 8 * len(KEYS)
    server.start()
    assert tracking.flush_buffered(server.uri, wait_s=60) == 8 * len(KEYS)
    assert _history(server.uri, run_id) == {k: list(range(28)) for k in KEYS}  # every point, each once
    assert not (metric_buffer.root() / run_id).exists()


@pytest.mark.e2e
@pytest.mark.slow
def test_a_real_run_through_an_outage_finishes_with_every_point(server, workdir, tiny_config):
    """`forgetless compare` against the server, which is stopped once the transfer's first checkpoint is written and
    started again a minute later: the run finishes, and the child run's target accuracy history holds one point per
    evaluation in its state.json history, each step once."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from .fault_servers import wait_until

    cfg = tiny_config(train={"epochs": 6, "lr": 0.01, "batch_size": 64})
    Path("tiny.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_ADDRESS": "", "MLFLOW_TRACKING_URI": server.uri}
    run = subprocess.Popen([str(Path(sys.executable).parent / "forgetless"), "compare", "tiny.yaml"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = workdir / "forgetless_runs"
    wait_until("the transfer's first checkpoint", lambda: any(runs.glob("tiny-finetune-*/checkpoint_s1_p0_e0001"))
               or run.poll() is not None, 900)
    server.stop()
    time.sleep(60)  # the outage: longer than the retry budget, while the workers train on
    server.start()
    out, _ = run.communicate(timeout=1500)
    assert run.returncode == 0, out[-4000:]
    state = json.loads(next(runs.glob("tiny-finetune-*/final/state.json")).read_text())
    c = MlflowClient(server.uri)
    key = next(k for k in ("val/target/acc", "target/acc") if k in c.get_run(state["mlflow_run_id"]).data.metrics)
    steps = [m.step for m in c.get_metric_history(state["mlflow_run_id"], key)]
    assert len(steps) == len(set(steps))
    assert sorted(steps) == sorted({h["step"] for h in state["history"]})  # every evaluation, none lost
