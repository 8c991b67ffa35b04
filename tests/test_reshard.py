"""Checkpoints that resume on another number of workers (platform/worker/reshard.py): for ZeRO-0, 1, 2, 3 and ZeRO-3
partitions, real DeepSpeed engines on gloo ranks (subprocesses meeting through a file, no Ray) train, save, resume on
another count and save again: the weights, fp32 master copies, optimizer moments (exp_avg, exp_avg_sq), steps,
learning-rate schedule and engine counters after the resume equal those saved (exactly), and the training that follows
equals the uninterrupted run's (to float tolerance: the gradient's mean is summed in another order).

CI runs 2 -> 1 -> 2; the slow tier 3 -> 2 -> 4 (uneven slices and padding), and 2 -> 1 -> 2 with DeepSpeed's seam off
(a resume on another count is refused, naming the count).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forgetless._compat import PUBLIC_PATHS_VARIABLE
from forgetless.platform.worker import checkpoints
from forgetless.platform.worker.checkpoint_io import checkpoint_world_size
from forgetless.platform.worker.reshard import read_saved_optimizer, written_world_size

VARIANTS = ("zero0", "zero1", "zero2", "zero3", "partitions")
GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4 workers

_RANKS_SCRIPT = r"""
import os, shutil, sys, tempfile, time, torch
from pathlib import Path
from types import SimpleNamespace
t_start = time.perf_counter()
rank, world, store, out, run, variants = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]),
                                          sys.argv[5], sys.argv[6].split(","))
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT="0", RANK=str(rank),
                  WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
torch.set_num_threads(1)
import deepspeed
deepspeed.init_distributed(dist_backend="gloo", init_method=f"file://{store}", rank=rank, world_size=world)
from torch import nn
from forgetless.config import DeepSpeedSpec, OptimConfig
from forgetless.platform.worker import checkpoint_io, checkpoints
from forgetless.platform.worker import engine as ds
from forgetless.strategies.base import ParamGroup, Phase

BATCH = int(os.environ["GLOBAL_BATCH"])

class Net(nn.Module):  # odd sizes (ZeRO's padding), a frozen layer, a buffer, two parameter groups
    def __init__(self):
        super().__init__()
        self.a, self.frozen, self.b = nn.Linear(5, 7), nn.Linear(7, 7), nn.Linear(7, 3)
        self.register_buffer("scale", torch.tensor([0.5, 1.0, 2.0]))
    def forward(self, x):
        return self.b(torch.relu(self.frozen(torch.relu(self.a(x))))) * self.scale

def batch(k):  # global batch k; this rank's rows
    g = torch.Generator().manual_seed(100 + k)
    x, y = torch.randn(BATCH, 5, generator=g), torch.randint(0, 3, (BATCH,), generator=g)
    n = BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]

def setup(variant, seed):  # "zero<stage>" or "partitions", "-bf16" for bf16 weights (DeepSpeed's bf16 optimizer)
    kind, _, precision = variant.partition("-")
    stage = 3 if kind == "partitions" else int(kind[-1])
    spec = DeepSpeedSpec(zero_stage=stage, precision=precision or "fp32")
    optim = OptimConfig(optimizer="adamw", batch_size=BATCH // world, lr=0.02)
    torch.manual_seed(seed)
    if kind == "partitions":
        with ds.partitioned_construction(ds.deepspeed_config(spec, optim.batch_size, world, False)):
            model = Net()
    else:
        model = Net()
    return model, spec, optim, stage

def engine(model, spec, optim):
    phase = Phase("ft", 1, [ParamGroup("a", list(model.a.parameters()), 0.02),
                            ParamGroup("b", list(model.b.parameters()), 0.005)],
                  lr_multipliers=lambda s: [1.0 / (1 + s), 1.0 / (1 + 0.5 * s)])
    return ds.make_engine(model, phase, optim, spec, world, False)

def train(eng, steps):
    for k in steps:
        x, y = batch(k)
        x = x.to(next(eng.module.parameters()).dtype)
        eng.backward(torch.nn.functional.cross_entropy(eng(x), y))
        eng.step()

def full_weights(model, variant, stage):
    if variant.startswith("partitions"):
        return ds.streamed_state_dict(model, rank)
    return ds.consolidated_state_dict(model, stage, rank)

def worker_run(model, stage, variant, eng=None):  # what checkpoint_io reads of a WorkerRun
    policy = SimpleNamespace(exports_model=False)
    return SimpleNamespace(model=model, rank=rank, world=world, partitioned=variant.startswith("partitions"),
                           engine=eng, zero_stage=stage, job=SimpleNamespace(checkpoints=policy),
                           state=SimpleNamespace(epoch=1), resume_dir=None)

def save(eng, model, variant, stage, folder):  # what checkpoint_io.save_checkpoint writes
    eng.save_checkpoint(str(folder), tag=checkpoint_io.DS_TAG)
    checkpoint_io.write_weights(worker_run(model, stage, variant, eng), folder, final=False)

def resume(model, make, variant, stage, folder):  # what checkpoint_io.restore and resume_optimizer do
    run = worker_run(model, stage, variant)
    checkpoint_io.load_weights(run, folder)
    run.engine = make()
    run.resume_dir = tempfile.mkdtemp()  # (resume_optimizer deletes its copy)
    shutil.copytree(folder, run.resume_dir, dirs_exist_ok=True)
    checkpoint_io.resume_optimizer(run)
    return run.engine

print(f"rank {rank}: started in {time.perf_counter() - t_start:.1f} s", flush=True)
for variant in variants:
    t0 = time.perf_counter()
    base = out / variant
    model, spec, optim, stage = setup(variant, seed=0 if run == "first" else 1)  # resumed: other initial weights
    make = lambda: engine(model, spec, optim)
    if run == "first":  # 3 steps, checkpoint, 2 more (the reference the resumed run must match)
        eng = make()
        train(eng, range(3))
        save(eng, model, variant, stage, base / "ckpt1")
        train(eng, range(3, 5))
        ref = full_weights(model, variant, stage)
        if rank == 0:
            torch.save(ref, base / "after1.pt")
    else:
        src = base / ("ckpt1" if run == "second" else "ckpt2")
        eng = resume(model, make, variant, stage, src)
        save(eng, model, variant, stage, base / f"resumed_{run}")  # what the resume holds, before any step
        train(eng, range(3, 5) if run == "second" else range(5, 7))
        ref = full_weights(model, variant, stage)
        if rank == 0:
            want = torch.load(base / ("after1.pt" if run == "second" else "after2.pt"))
            worst = max((ref[k].float() - want[k].float()).abs().max().item() for k in want)
            tolerance = 1e-5 if "bf16" not in variant else 1e-2  # bf16: the weights' own rounding
            assert worst < tolerance, f"{variant} {run}: training after the resume differs by {worst}"
            print(f"rank {rank}: {variant} {run}: training after the resume differs by {worst:.2e}", flush=True)
        if run == "second":  # checkpoint 2 (written by this count) and its reference
            save(eng, model, variant, stage, base / "ckpt2")
            train(eng, range(5, 7))
            ref = full_weights(model, variant, stage)
            if rank == 0:
                torch.save(ref, base / "after2.pt")
    eng.destroy()
    print(f"rank {rank}: {variant} {run} ok in {time.perf_counter() - t0:.1f} s", flush=True)
"""


def run_ranks(folder: Path, world: int, run: str, variants: tuple[str, ...], env_extra: dict | None = None,
              expect_ok: bool = True) -> str:
    """The script on `world` gloo ranks (subprocesses); their output. Fails the test if a rank fails (unless not
    `expect_ok`: then the ranks' output of a failure is returned)."""
    script = folder / "ranks.py"
    script.write_text(_RANKS_SCRIPT)
    store = folder / f"rendezvous_{run}_{world}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "GLOBAL_BATCH": str(GLOBAL_BATCH),
           **(env_extra or {})}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(store), str(folder), run,
                               ",".join(variants)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env) for r in range(world)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    ok = all(p.returncode == 0 for p in procs)
    if ok != expect_ok:
        pytest.fail(f"{run} run on {world} ranks {'failed' if expect_ok else 'passed'}:\n"
                    + "\n".join(o[-3000:] for o in outs))
    print("\n".join(line for o in outs for line in o.splitlines() if line.startswith("rank ")))
    return "\n".join(outs)


def assert_equal_nested(a, b, what: str) -> None:
    """Equal tensors (exactly) and values, through dicts and lists."""
    if torch.is_tensor(a):
        assert torch.equal(a, b), what
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (what, a.keys(), b.keys())
        for k in a:
            assert_equal_nested(a[k], b[k], f"{what}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f"{what}/{i}")


def assert_same_state(written: Path, resumed: Path, what: str, fp32_weights: bool = True) -> None:
    """The state a resumed engine saves before any step equals the checkpoint it resumed from: weights, and every
    trained parameter's fp32 copy and optimizer moments, steps, hyperparameters, schedule and counters."""
    if written_world_size(written / "ds") is None:  # ZeRO-0: one file, DeepSpeed's own layout on any count
        a, b = (checkpoints.safe_torch_load(f / "ds" / "mp_rank_00_model_states.pt") for f in (written, resumed))
        assert_equal_nested(a["optimizer"], b["optimizer"], what)
        for k in ("lr_scheduler", "global_steps", "global_samples"):
            assert a[k] == b[k], (what, k, a[k], b[k])
    else:
        a, b = read_saved_optimizer(written / "ds"), read_saved_optimizer(resumed / "ds")
        assert a.numel == b.numel and a.numel, what
        keys = {k for (_, k) in a.values}
        assert {"fp32", "exp_avg", "exp_avg_sq"} <= keys, keys
        for name in a.numel:
            for key in keys:
                assert torch.equal(a.full(name, key), b.full(name, key)), (what, name, key)
        assert {g: s["step"] for g, s in a.group_state.items()} == {g: s["step"] for g, s in b.group_state.items()}
        assert all(s["step"] > 0 for s in a.group_state.values())
        assert a.param_groups == b.param_groups, what
        assert a.engine_state == b.engine_state, (what, a.engine_state, b.engine_state)
        if fp32_weights and (written / "model.pt").exists():  # fp32: the master copy is the weights (checks the reader)
            weights = checkpoints.safe_torch_load(written / "model.pt", deepspeed_types=False)
            for name in a.numel:
                assert torch.equal(a.full(name, "fp32"), weights[name].reshape(-1)), (what, name)
    if (written / "model.pt").exists():  # (bf16 weights are rounded from their fp32 copies, as DeepSpeed rounds them)
        wa, wb = (checkpoints.safe_torch_load(f / "model.pt", deepspeed_types=False) for f in (written, resumed))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), what


def resume_twice(folder: Path, worlds: tuple[int, int, int], variants: tuple[str, ...]) -> list[str]:
    """Checkpoints written by worlds[0] ranks (in `folder`) resumed on worlds[1], and theirs on worlds[2]; the
    resumes whose state was compared with their checkpoint's (every one, or an assertion failed first)."""
    first, second, third = worlds
    compared: list[str] = []
    run_ranks(folder, second, "second", variants)
    run_ranks(folder, third, "third", variants)
    for v in variants:
        base = folder / v
        if not v.startswith("zero0"):  # (ZeRO-0's one file does not tell, nor depend on it)
            assert checkpoint_world_size(base / "ckpt1") == first
            assert checkpoint_world_size(base / "ckpt2") == second
        fp32 = "bf16" not in v
        assert_same_state(base / "ckpt1", base / "resumed_second", f"{v}: {first} -> {second}", fp32)
        assert_same_state(base / "ckpt2", base / "resumed_third", f"{v}: {second} -> {third}", fp32)
        compared += [f"{v}: {first} -> {second}", f"{v}: {second} -> {third}"]
        if v.startswith("partitions"):
            parts = sorted(p.name for p in (base / "resumed_second").glob("model_partition_rank*.pt"))
            assert len(parts) == second, parts
    return compared


@pytest.fixture(scope="module")
def written_by_two(tmp_path_factory) -> Path:
    """Checkpoints of every variant written by 2 ranks (after 3 steps), with the weights 2 more steps reach."""
    folder = tmp_path_factory.mktemp("reshard")
    run_ranks(folder, 2, "first", VARIANTS)
    return folder


def test_every_zero_stage_resumes_two_workers_on_one_and_back(written_by_two):
    """2 -> 1 -> 2 for ZeRO-0, 1, 2, 3 and ZeRO-3 partitions: the state after each resume equals the checkpoint's,
    and the steps that follow equal the uninterrupted run's."""
    compared = resume_twice(written_by_two, (2, 1, 2), VARIANTS)
    assert len(compared) == 2 * len(VARIANTS) and "zero3: 1 -> 2" in compared


def test_a_resume_on_another_count_is_refused_with_the_seam_off(tmp_path, monkeypatch):
    """FORGETLESS_PUBLIC_PATHS=1 (or another DeepSpeed version): the re-shard is refused, before anything is read,
    with a line that names the worker count that resumes the checkpoint as it is."""
    from forgetless.platform.worker import checkpoint_io, reshard

    monkeypatch.setenv(PUBLIC_PATHS_VARIABLE, "1")
    with pytest.raises(RuntimeError, match=r"written by 2 workers .*re-shards only DeepSpeed 0\.19.*"
                                           r"resume with scaling\.num_workers: 2"):
        with checkpoint_io.refused_names_count(2):
            reshard.load_resharded(None, tmp_path, 0, 1)
    with pytest.raises(reshard.ReshardRefused, match="re-shards only"):
        reshard.resharded_partition_state(torch.nn.Linear(2, 2), [tmp_path / "part0.pt"], 0, 1)


@pytest.mark.slow
def test_uneven_counts_three_to_two_to_four_and_bf16(tmp_path):
    """3 -> 2 -> 4: slices that do not divide the parameters evenly, padding moving between ranks; also bf16 weights
    (ZeRO-0's one file; ZeRO-1's bf16 optimizer, `bf16_` shards; ZeRO-3)."""
    variants = (*VARIANTS, "zero0-bf16", "zero1-bf16", "zero3-bf16")
    run_ranks(tmp_path, 3, "first", variants)
    compared = resume_twice(tmp_path, (3, 2, 4), variants)
    assert len(compared) == 2 * len(variants) and "zero1-bf16: 3 -> 2" in compared and "zero3-bf16: 2 -> 4" in compared

