"""The embedded cluster a driver starts (ray_cluster.init_ray) runs without Ray's dashboard and metrics unless asked for
them (`forgetless --ray-dashboard`, FORGETLESS_RAY_DASHBOARD=1): then the dashboard answers at the address the driver
prints. Both starts run in a child process, as a `forgetless` command would, one after the other."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from forgetless.cli import main
from forgetless.console import DASHBOARD_VARIABLE

pytestmark = pytest.mark.e2e

CHILD = r"""
import json, os, sys, urllib.error, urllib.request
import ray
from forgetless.console import DASHBOARD_VARIABLE
from forgetless.platform.driver.ray_cluster import init_ray

def started():
    node = ray._private.worker._global_node
    return {"dashboard_url": node.webui_url or None,
            "metrics": node._ray_params._system_config.get("enable_metrics_collection", True)}

out = {}
init_ray(None, use_gpu=False, num_cpus=1)
out["default"] = started()
ray.shutdown()
os.environ[DASHBOARD_VARIABLE] = "1"
init_ray(None, use_gpu=False, num_cpus=1)
out["asked"] = started()
url = out["asked"]["dashboard_url"]
try:  # Ray's token authentication (on by default) answers 401 without the token: the server is there either way
    with urllib.request.urlopen(f"http://{url}/api/version", timeout=60) as r:
        out["status"] = r.status
except urllib.error.HTTPError as e:
    out["status"] = e.code
ray.shutdown()
print(json.dumps(out))
"""


def test_the_dashboard_and_metrics_start_only_when_asked():
    env = {k: v for k, v in os.environ.items() if k not in (DASHBOARD_VARIABLE, "RAY_ADDRESS")}
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["default"] == {"dashboard_url": None, "metrics": False}
    assert out["asked"]["dashboard_url"] and out["asked"]["metrics"] is True
    assert out["status"] in (200, 401)  # the dashboard answers where the driver said it is
    said = [line for line in done.stderr.splitlines() if "Ray dashboard: http://" in line]
    assert said == [f"[forgetless] Ray dashboard: http://{out['asked']['dashboard_url']}"], done.stderr[-3000:]


def test_the_cli_flag_sets_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(DASHBOARD_VARIABLE, raising=False)
    missing = str(tmp_path / "missing.yaml")
    assert main(["compare", missing]) == 2 and DASHBOARD_VARIABLE not in os.environ
    assert main(["--ray-dashboard", "compare", missing]) == 2  # refused (no such file), after the flag was read
    assert os.environ[DASHBOARD_VARIABLE] == "1"
