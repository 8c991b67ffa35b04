"""Shared fixtures: one embedded Ray cluster per test session, a clean working directory per test, tiny configs;
and helpers the tests import (`from conftest import ...`)."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def load_repo_script(relative: str):
    """A script of this repository that is not part of a package (tools/, benchmarks/, cluster/), imported by path
    once per process and registered under its file name (dataclasses in it need their module in sys.modules)."""
    name = Path(relative).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# The start of a one-rank DeepSpeed script run in a subprocess (gloo, CPU; no process group leaks into pytest).
# MASTER_PORT=0: the one rank's store binds a port the OS picks (a fixed or random one can be taken by a test process
# running beside this one).
ONE_RANK_DEEPSPEED_PRELUDE = r"""
import json, os, sys, torch
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT="0", RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
torch.set_num_threads(1)
import deepspeed
from forgetless.config import load_config
from forgetless.data import build_stream
from forgetless.platform.worker.engine import full_state_dict, make_engine, weight_access
from forgetless.platform.worker.evaluation import evaluate
from forgetless.platform.worker.model_io import build_model
from forgetless.strategies import make_strategy
from forgetless.strategies.training import set_train_mode, set_trainable, train_step
deepspeed.init_distributed(dist_backend="gloo")
cfg = load_config(json.loads(sys.argv[1]))
tasks = build_stream(cfg.source, cfg.targets)
"""


# The digits MLP a one-rank script fine-tunes (ONE_RANK_FINETUNE), with the DeepSpeed section a test adds.
ONE_RANK_MLP_CONFIG = {"name": "z", "source": {"dataset": "digits", "classes": [0, 1, 2]},
                       "targets": [{"dataset": "digits", "classes": [3, 4]}],
                       "backbone": {"name": "mlp", "params": {"hidden": [16]}}, "strategies": ["finetune"],
                       "train": {"lr": 0.05, "batch_size": 16, "optimizer": "adamw"}}

# After ONE_RANK_DEEPSPEED_PRELUDE: `finetune_eight_micro_batches(spec)` fine-tunes the config's model on the first
# target's first 128 examples, 16 a micro-batch, with an engine of the DeepSpeed section `spec`; it returns the
# engine and {updates (optimizer steps), moved (the largest weight change), weights}.
ONE_RANK_FINETUNE = r"""
from forgetless.strategies.base import task_infos
infos = task_infos(tasks)

def finetune_eight_micro_batches(spec):
    torch.manual_seed(0)
    strategy = make_strategy("finetune", {}, 1, cfg.train.lr)
    model = build_model(cfg, infos, strategy)
    phase = strategy.phases(model, infos[1])[-1]
    set_trainable(model, phase)
    engine = make_engine(model, phase, cfg.train, spec, 1, False)
    set_train_mode(model, phase)
    access = weight_access(model, spec.zero_stage)
    before = {k: v.clone() for k, v in full_state_dict(model, 0).items()}
    updates = 0
    for i in range(0, 128, 16):
        x, y = tasks[1].x_train[i:i + 16], tasks[1].y_train[i:i + 16]
        updates += train_step(engine, model, strategy, phase, infos[1], x, y, torch.Generator(), access)[1]
    full = full_state_dict(model, 0)
    return engine, {"updates": updates, "moved": max(float((full[k] - before[k]).abs().max()) for k in full),
                    "weights": {k: v.flatten().tolist() for k, v in full.items()}}
"""


def run_one_rank_script(tmp_path: Path, script: str, *args: str, env: dict[str, str] | None = None) -> list[dict]:
    """Run `script` (a one-rank DeepSpeed script: ONE_RANK_DEEPSPEED_PRELUDE and what follows) in a subprocess with
    `args`, and return the JSON of every line it prints as `RESULT {...}`."""
    import subprocess

    path = tmp_path / f"one_rank_{len(list(tmp_path.glob('one_rank_*.py')))}.py"
    path.write_text(script)
    out = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=600, check=False,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line[len("RESULT "):]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]


def committed_transfer_epoch(snapshot: str) -> int | None:
    """The epoch of the latest transfer checkpoint Ray Train has committed, from the text of a run's
    checkpoint_manager_snapshot.json: None if none yet, 10**6 once the transfer stage is done. A checkpoint folder is
    written before the controller commits it (it polls the workers every 2 s, one report queued per worker), so on a
    loaded machine a folder can exist while the resume point is still an earlier one."""
    try:
        latest = (json.loads(snapshot).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name") or ""
    except ValueError:  # caught while being rewritten
        return None
    m = re.fullmatch(r"checkpoint_s1_p0_e(\d{4})", latest)
    return int(m.group(1)) if m else (10**6 if latest in ("checkpoint_s1_done", "final") else None)


@pytest.fixture(scope="session")
def _ray_shut_down_at_the_end():
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def ray_session(_ray_shut_down_at_the_end):
    """A real embedded Ray cluster (2 CPUs), shared by the end-to-end tests of the session (process): started by the
    first module that asks for it, and again by a later one if a module shut it down in between
    (tests/faults/test_bad_input.py needs Ray down whatever ran before it)."""
    import ray

    from forgetless.platform.driver.ray_cluster import init_ray

    if not ray.is_initialized():
        init_ray(None, use_gpu=False, num_cpus=2)  # as `forgetless run` starts it, with 2 CPUs
    return ray


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run inside a fresh folder: its own ./mlflow.db, ./mlruns and ./forgetless_runs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


# Every `mlflow server` a test starts: without MLflow's job runner (a huey consumer pool for GenAI evaluation jobs and
# trace roll-ups, eight more Python processes that import MLflow at the server's start); nothing of forgetless uses it.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

TINY = {
    "name": "tiny",
    "seed": 0,
    "source": {"dataset": "digits", "classes": [0, 1, 2, 3, 4]},
    "targets": [{"dataset": "digits", "classes": [5, 6, 7, 8, 9]}],
    "backbone": {"name": "mlp", "params": {"hidden": [32]}},
    "pretrain": {"epochs": 2, "checkpoint_every": 1, "lr": 0.01, "batch_size": 64},
    "train": {"epochs": 2, "lr": 0.01, "batch_size": 64},
    "strategies": ["finetune"],
    "scaling": {"num_workers": 2},
    "deepspeed": {"zero_stage": 2},
    "tracking": {"log_model": False},
}


@pytest.fixture
def tiny_config():
    """A factory for a small, fast digits 0-4 -> 5-9 config (a dict); keyword arguments replace top-level fields."""

    def make(**fields):
        cfg = copy.deepcopy(TINY)
        cfg.update(copy.deepcopy(fields))
        return cfg

    return make


@pytest.fixture
def one_intra_op_thread():
    """Tiny tensors: a second intra-op thread only adds contention on a shared 2-core machine (restored after)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def s3server(tmp_path_factory, local_stack_module):
    """A real S3-compatible server (moto in server mode, as cluster/local_stack.py starts it) for one test module."""
    stack = local_stack_module.LocalStack(str(tmp_path_factory.mktemp("s3stack")))
    stack.up_s3_only()
    yield stack
    stack.down()


def point_aws_env_at(server, monkeypatch) -> None:
    """The standard AWS variables (what a user sets for MinIO) pointing at `server`; no profile."""
    for k, v in server.client_env().items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture(scope="session")
def local_stack_module():
    """cluster/local_stack.py (scripts, not a package), imported once."""
    return load_repo_script("cluster/local_stack.py")
