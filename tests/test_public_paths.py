"""The library seams (forgetless/_compat) and their public paths. Unit: a seam outside its range, or missing a private
name, takes the public path and says so once; importing a seam imports nothing heavy; each seam's public path does its
job. End to end: the e2e core with every library seam off (FORGETLESS_PUBLIC_PATHS=1: Ray's own TorchTrainer and controller, MLflow's
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
from forgetless._compat import PUBLIC_PATHS_VARIABLE, Seam, cpython, in_range, ray_core
from forgetless._compat import mlflow as compat_mlflow
from forgetless._compat import torch as compat_torch

# What a process on the public paths says once per library (forgetless/_compat/__init__.py)
PUBLIC_PATH_LINE = f"{PUBLIC_PATHS_VARIABLE}=1: using Ray Train"


def test_version_ranges():
    assert in_range("2.60.0", "2.60", "2.61") and in_range("2.13.0+cpu", "2.13", "2.14")
    assert not in_range("2.61.0", "2.60", "2.61") and not in_range("2.59.9", "2.60", "2.61")
    assert in_range("0.19.8", "0.19", "0.20") and not in_range("0.20.0rc1", "0.19", "0.20")


def test_a_seam_outside_its_range_takes_the_public_path_and_says_so_once(capsys, monkeypatch):
    monkeypatch.delenv(PUBLIC_PATHS_VARIABLE, raising=False)
    seam = Seam("Ray", "ray", "1.0", "1.1", slower="every fit starts more processes")
    assert not seam.active() and not seam.active()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Ray 2." in err and ">=1.0,<1.1" in err and "every fit starts more" in err


def test_a_seam_whose_private_name_moved_takes_the_public_path(capsys, monkeypatch):
    monkeypatch.delenv(PUBLIC_PATHS_VARIABLE, raising=False)

    def probe():
        from ray._private import no_such_module  # noqa: F401

    seam = Seam("Ray", "ray", "2.0", "99.0", slower="slower", probe=probe)
    assert not seam.active()
    assert "lacks an internal" in capsys.readouterr().err
    assert Seam("Ray", "ray", "2.0", "99.0", slower="slower").active()


def test_the_switch_turns_a_seam_off(capsys, monkeypatch):
    seam = Seam("Ray", "ray", "2.0", "99.0", slower="slower")
    monkeypatch.setenv(PUBLIC_PATHS_VARIABLE, "1")
    assert not seam.active()
    assert f"{PUBLIC_PATHS_VARIABLE}=1: using Ray" in capsys.readouterr().err
    monkeypatch.setenv(PUBLIC_PATHS_VARIABLE, "0")
    assert seam.active()


def test_importing_the_seams_imports_no_library_it_need_not():
    out = subprocess.run([sys.executable, "-c", (
        "import sys, forgetless._compat.mlflow, forgetless._compat.deepspeed, forgetless._compat.torch, "
        "forgetless._compat.cpython, forgetless.platform.tracking.mlflow_runs; "
        "print(sorted(m for m in ('mlflow', 'deepspeed', 'torch') if m in sys.modules))")],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_the_public_paths_of_small_seams(monkeypatch):
    import torch
    from torch import nn

    monkeypatch.setenv(PUBLIC_PATHS_VARIABLE, "1")
    assert ray_core.cpu_count() >= 1
    assert not cpython.run_exit_handlers()
    kinds = compat_torch.batch_norm_types()
    assert all(isinstance(m, kinds) for m in (nn.BatchNorm1d(2), nn.BatchNorm2d(2), nn.SyncBatchNorm(2)))
    assert not isinstance(nn.LayerNorm(2), kinds)
    # DeepSpeed: without the seam every trainable weight goes to safe_set_full_fp32_param, which leaves a weight that
    # has no master copy as it is
    from forgetless._compat import deepspeed as compat_deepspeed
    from forgetless.platform.worker.engine import write_back_weights

    layer = nn.Linear(2, 2)
    before = layer.weight.detach().clone()
    assert compat_deepspeed.has_master_copy(layer.weight)
    write_back_weights(layer)
    assert torch.equal(layer.weight, before)
    monkeypatch.setenv(PUBLIC_PATHS_VARIABLE, "0")
    assert not compat_deepspeed.has_master_copy(layer.weight)  # the seam knows it has none
    monkeypatch.setenv(PUBLIC_PATHS_VARIABLE, "1")
    logged = []
    sampler = compat_mlflow.start_system_metrics("unused", "unused", 0.05, lambda m, step: logged.append((step, m)))
    try:
        import time

        time.sleep(0.5)
    finally:
        sampler.finish()
    assert logged[0][0] == 0 and {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= \
        set(logged[0][1])
    assert [step for step, _ in logged] == list(range(len(logged))) and len(logged) > 1


def test_the_cli_exits_the_normal_way_on_cpythons_public_path(tmp_path):
    env = {**os.environ, PUBLIC_PATHS_VARIABLE: "1"}
    done = subprocess.run([sys.executable, "-c", (
        "import atexit, pathlib\nfrom forgetless import cli\n"
        "atexit.register(lambda: pathlib.Path('atexit-ran').write_text('yes'))\n"
        "cli.entry(['compare', 'missing.yaml'])\n")], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=180)
    assert done.returncode == 2, done.stderr
    assert (tmp_path / "atexit-ran").read_text() == "yes"


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


# slow tier (make test-all): CI's 15-minute budget (docs/performance.md); run and reported in the stop's closing note
@pytest.mark.slow
@pytest.mark.e2e
def test_compare_on_the_public_paths_gives_the_same_accuracy_matrix(workdir, tiny_config):
    cfg = tiny_config()  # pre-training and one strategy: two fits per path, ~70-100 s each compare on 2 cores
    seams, seams_log = _cli_json(cfg, workdir / "seams", "compare", public=False)
    public, public_log = _cli_json(cfg, workdir / "public", "compare", public=True)
    assert PUBLIC_PATH_LINE in public_log and PUBLIC_PATHS_VARIABLE not in seams_log
    assert [r["label"] for r in public] == [r["label"] for r in seams] == ["finetune"]
    assert [r["R"] for r in public] == [r["R"] for r in seams]


@pytest.mark.e2e
@pytest.mark.slow
def test_a_killed_worker_recovers_on_the_public_paths(workdir, tiny_config, monkeypatch):
    """tests/faults/test_worker_kill.py with the seams off (its CLI process inherits the switch)."""
    monkeypatch.setenv(PUBLIC_PATHS_VARIABLE, "1")
    worker_kill.test_killed_worker_recovers_by_itself_with_the_same_accuracy_matrix(workdir, tiny_config)
    assert PUBLIC_PATH_LINE in output(workdir)


@pytest.mark.e2e
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
