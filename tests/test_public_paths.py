"""The e2e core with every library seam off (FORGETLESS_PUBLIC_PATHS=1: Ray's own TorchTrainer and controller, MLflow's
own store creation and client calls, DeepSpeed importing its optimizers itself, ...; docs/architecture.md, "Library
seams"): a compare gives the same accuracy matrix as with the seams on; a killed worker recovers to the matrix of an
uninterrupted run; a Tune grid gives every trial the same results. Each command runs as the CLI in a process of its
own, so that the embedded cluster's workers get the switch too."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from faults import test_worker_kill as worker_kill
from faults.cli_runs import output
from forgetless._compat import PUBLIC_PATHS_VARIABLE

pytestmark = pytest.mark.e2e

# What a process on the public paths says once per library (forgetless/_compat/__init__.py)
PUBLIC_PATH_LINE = f"{PUBLIC_PATHS_VARIABLE}=1: using Ray Train"


def _cli_json(cfg: dict, folder: Path, command: str, public: bool) -> tuple[object, str]:
    """`forgetless COMMAND c.yaml --json` in `folder`, seams on or off: (its JSON, its stderr)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1", PUBLIC_PATHS_VARIABLE: "1" if public else "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-m", "forgetless.cli", command, "c.yaml", "--json"], cwd=folder, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(out.stdout), out.stderr


def test_compare_on_the_public_paths_gives_the_same_accuracy_matrix(workdir, tiny_config):
    cfg = tiny_config(strategies=["finetune", "linear_probe"])
    seams, seams_log = _cli_json(cfg, workdir / "seams", "compare", public=False)
    public, public_log = _cli_json(cfg, workdir / "public", "compare", public=True)
    assert PUBLIC_PATH_LINE in public_log and PUBLIC_PATHS_VARIABLE not in seams_log
    assert [r["label"] for r in public] == [r["label"] for r in seams] == ["finetune", "linear_probe"]
    assert [r["R"] for r in public] == [r["R"] for r in seams]


@pytest.mark.slow
def test_a_killed_worker_recovers_on_the_public_paths(workdir, tiny_config, monkeypatch):
    """tests/faults/test_worker_kill.py with the seams off (its CLI process inherits the switch)."""
    monkeypatch.setenv(PUBLIC_PATHS_VARIABLE, "1")
    worker_kill.test_killed_worker_recovers_by_itself_with_the_same_accuracy_matrix(workdir, tiny_config)
    assert PUBLIC_PATH_LINE in output(workdir)


@pytest.mark.slow
def test_a_tune_grid_on_the_public_paths_gives_every_trial_the_same_results(workdir, tiny_config):
    cfg = tiny_config(scaling={"num_workers": 1}, search={"space": {"stop_point": [1, 2], "train.lr": [0.01, 0.0001]}})
    runs = {public: _cli_json(cfg, workdir / ("public" if public else "seams"), "tune", public) for public in (0, 1)}
    assert PUBLIC_PATH_LINE in runs[1][1]

    def results(search: dict) -> dict:
        return {(t["params"]["stop_point"], t["params"]["train.lr"]):
                (t["status"], t["objective"], {k: v for k, v in t["metrics"].items() if k.startswith("test/")})
                for t in search["trials"]}

    assert len(results(runs[1][0])) == 4
    assert results(runs[1][0]) == results(runs[0][0])
