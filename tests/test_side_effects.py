"""The Python API leaves the calling process as it was: after forgetless.compare() returns, and after one that raises a
ConfigError (here once Ray runs), the process's environment, its SIGINT and SIGTERM handlers and the functions a run
patches (torch.compile while DeepSpeed imports, ...) are the ones it had before. Ray stays initialised, as after
ray.init (docs/architecture.md, "Side effects"). Checked in a fresh interpreter: a test process has its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

_SCRIPT = r"""
import builtins, json, os, signal, sys, threading

import forgetless
import torch


def snapshot():
    return {
        "environ": dict(os.environ),
        "handlers": {s.name: repr(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM)},
        "functions": {name: id(f) for name, f in {
            "torch.compile": torch.compile, "torch.load": torch.load, "builtins.print": builtins.print,
            "sys.stdout": sys.stdout, "sys.stderr": sys.stderr, "sys.excepthook": sys.excepthook,
            "threading.excepthook": threading.excepthook}.items()},
    }


def handler(signum, frame):  # the caller's own handlers: they must still be the ones set afterwards
    pass


signal.signal(signal.SIGTERM, handler)
signal.signal(signal.SIGINT, handler)
cfg = json.loads(sys.argv[1])
states = {"before": snapshot()}
result = forgetless.compare(cfg)
states["after compare"] = snapshot()
try:
    forgetless.compare({**cfg, "scaling": {"num_workers": 64}})  # refused once Ray runs: it cannot place 64 workers
    raise SystemExit("the ConfigError was not raised")
except forgetless.ConfigError:
    pass
states["after a ConfigError"] = snapshot()
import ray
states["ray initialised"] = ray.is_initialized()
states["R"] = [r.accuracy_matrix.tolist() for r in result.results]
print("STATES " + json.dumps(states))
"""


def _differences(before: dict, after: dict) -> list[str]:
    env_b, env_a = before["environ"], after["environ"]
    out = [f"os.environ[{k!r}]: {env_b.get(k)!r} -> {env_a.get(k)!r}"
           for k in sorted(set(env_b) | set(env_a)) if env_b.get(k) != env_a.get(k)]
    out += [f"{kind} {name}: changed" for kind in ("handlers", "functions")
            for name in before[kind] if before[kind][name] != after[kind][name]]
    return out


# slow tier (make test-all): CI's 15-minute budget (docs/performance.md); run and reported in the stop's closing note
@pytest.mark.slow
def test_compare_and_a_refused_compare_leave_the_process_as_it_was(workdir, tiny_config):
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(tiny_config())], cwd=workdir, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    states = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("STATES "))[len("STATES "):])
    assert states["R"] and states["ray initialised"]  # a real run, and Ray kept as ray.init keeps it
    differences = {when: _differences(states["before"], states[when]) for when in ("after compare", "after a ConfigError")}
    assert differences == {"after compare": [], "after a ConfigError": []}
