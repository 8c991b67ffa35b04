"""A driver killed mid-run (SIGKILL: it can end nothing itself) leaves nothing stale behind once the same command
runs again: its MLflow parent run is continued (one parent per experiment, counting two invocations, every child
under it), its Ray processes are gone (a watcher ends them), the resumed
child run holds each metric point once, and the run's wall time sums both invocations."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.driver.watchdog import WallClock

from .fault_servers import wait_until


PARENT_TAGS = {"forgetless.command": "compare", "forgetless.name": "tiny", "forgetless.config_hash": "0123abcd"}
# A driver that opens its parent run and is then killed before it can end it.
KILLED_DRIVER = """
import os, signal, sys
from forgetless.platform.tracking import mlflow_runs as tracking
uri, exp_id = sys.argv[1], sys.argv[2]
tags = {"forgetless.command": "compare", "forgetless.name": "tiny", "forgetless.config_hash": "0123abcd"}
print(tracking.start_parent_run(uri, exp_id, "tiny (compare)", tags), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_parent_run_left_running_by_a_killed_driver_is_closed_as_killed(workdir):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp_id = c.create_experiment("stale")
    out = subprocess.run([sys.executable, "-c", KILLED_DRIVER, uri, exp_id], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    stale = out.stdout.split()[-1]
    assert c.get_run(stale).info.status == "RUNNING"
    other = c.create_run(exp_id, tags={**PARENT_TAGS, "forgetless.config_hash": "ffffffff"}).info.run_id
    new = tracking.start_parent_run(uri, exp_id, "tiny (compare)", PARENT_TAGS)
    assert c.get_run(stale).info.status == "KILLED"
    assert c.get_run(new).info.status == "RUNNING"
    assert c.get_run(other).info.status == "RUNNING"  # another config's run is not touched
    # a live driver of the same command (this test process) is left alone too
    again = tracking.start_parent_run(uri, exp_id, "tiny (compare)", PARENT_TAGS)
    assert c.get_run(new).info.status == "RUNNING" and again != new


def test_wall_time_sums_every_invocation(tmp_path):
    wall_uri = str(tmp_path / "driver_wall.json")
    first = WallClock(wall_uri)
    first.write()  # what the watch keeps writing while the first invocation runs (then it is killed)
    second = WallClock(wall_uri)
    total = second.write(finished=True)
    data = json.loads(Path(wall_uri).read_text())
    assert len(data["invocations"]) == 2 and data["finished"]
    assert total == data["wall_seconds"] == pytest.approx(sum(data["invocations"]))
    assert data["invocations"][0] == pytest.approx(first.elapsed(), abs=5)


def _compare(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).parent / "forgetless"), "compare", "tiny.yaml"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _ray_processes_of(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True)]


@pytest.mark.e2e
@pytest.mark.slow
def test_killed_driver_leaves_nothing_stale(workdir, tiny_config):
    # epochs of the tiny task take ~0.5 s: enough of them that the kill lands mid-run (6 once ended before it)
    cfg = tiny_config(train={"epochs": 30, "lr": 0.01, "batch_size": 64})
    Path("tiny.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_ADDRESS": "", "FORGETLESS_WATCH_EVERY_S": "2",
           "FORGETLESS_METRIC_BUFFER": str(workdir / "buffer")}
    first = _compare(env)
    runs = workdir / "forgetless_runs"
    wait_until("the first invocation's epoch-2 transfer checkpoint",
               lambda: any(runs.glob("tiny-finetune-*/checkpoint_s1_p0_e0002")) or first.poll() is not None, 900)
    assert first.poll() is None, first.stdout.read()[-3000:]
    ray_procs = _ray_processes_of(first.pid)
    assert ray_procs, "the embedded cluster's processes should be children of the driver"
    os.kill(first.pid, signal.SIGKILL)
    assert not any(runs.glob("tiny-finetune-*/final")), "the first invocation's run ended before the kill"
    first.wait(30)
    wait_until("every Ray process of the killed driver to end",
               lambda: not [p for p in ray_procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], 120)

    second = _compare(env)
    out, _ = second.communicate(timeout=1500)
    assert second.returncode == 0, out[-4000:]
    assert "continuing parent run" in out and "View run" not in out

    c = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = c.get_experiment_by_name("forgetless")
    parents = c.search_runs([exp.experiment_id], "tags.`forgetless.command` = 'compare'",
                            order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in parents] == ["FINISHED"]
    parent = parents[0]
    assert parent.data.tags["forgetless.invocations"] == "2"
    children = c.search_runs([exp.experiment_id], f"tags.`{tracking.PARENT_TAG}` = '{parent.info.run_id}'")
    assert {r.data.tags["forgetless.mode"] for r in children} == {"pretrain", "transfer"}
    assert len(c.search_runs([exp.experiment_id], "tags.`forgetless.mode` != ''")) == len(children)
    child = c.search_runs([exp.experiment_id], "tags.`forgetless.mode` = 'transfer'")[0]
    for key in child.data.metrics:
        steps = [m.step for m in c.get_metric_history(child.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)

    wall = json.loads(next(runs.glob("tiny-finetune-*/driver_wall.json")).read_text())
    assert len(wall["invocations"]) == 2 and wall["finished"]
    assert wall["wall_seconds"] == pytest.approx(sum(wall["invocations"]))
