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
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forgetless._compat import PUBLIC_PATHS_VARIABLE
from forgetless.platform.worker import checkpoints
from forgetless.platform.worker.reshard import read_saved_optimizer, written_world_size

VARIANTS = ("zero0", "zero1", "zero2", "zero3", "partitions")
GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4 workers

_RANKS_SCRIPT = r"""
import os, sys, torch
from pathlib import Path
rank, world, store, out, run, variants = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]),
                                          sys.argv[5], sys.argv[6].split(","))
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT="0", RANK=str(rank),
                  WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
torch.set_num_threads(1)
import deepspeed
deepspeed.init_distributed(dist_backend="gloo", init_method=f"file://{store}", rank=rank, world_size=world)
from torch import nn
from forgetless.config import DeepSpeedSpec, OptimConfig
from forgetless.platform.worker import checkpoints, reshard
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

def setup(variant, seed):
    stage = 0 if variant == "zero0" else 3 if variant == "partitions" else int(variant[-1])
    spec, optim = DeepSpeedSpec(zero_stage=stage), OptimConfig(optimizer="adamw", batch_size=BATCH // world, lr=0.02)
    torch.manual_seed(seed)
    if variant == "partitions":
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
        eng.backward(torch.nn.functional.cross_entropy(eng(x), y))
        eng.step()

def full_weights(model, variant, stage):
    if variant == "partitions":
        return ds.streamed_state_dict(model, rank)
    return ds.consolidated_state_dict(model, stage, rank)

def save(eng, model, variant, stage, folder):
    eng.save_checkpoint(str(folder), tag="ds")
    if variant == "partitions":
        torch.save(ds.partition_state(model), folder / f"model_partition_rank{rank}.pt")
    state = full_weights(model, variant, stage)
    if rank == 0 and variant != "partitions":
        torch.save(state, folder / "model.pt")

def resume(model, eng, variant, folder):
    # what checkpoint_io.load_weights and resume_optimizer do
    if variant == "partitions":
        files = sorted(folder.glob("model_partition_rank*.pt"), key=lambda p: int(p.stem.rsplit("rank", 1)[1]))
        state = (reshard.resharded_partition_state(model, files, rank, world) if len(files) != world else
                 checkpoints.safe_torch_load(files[rank], deepspeed_types=False))
        ds.load_partition_state(model, state)
    else:
        model.load_state_dict(checkpoints.safe_torch_load(folder / "model.pt", deepspeed_types=False))
    eng = eng()
    written = reshard.written_world_size(folder / "ds")
    if written is not None and written != world:
        reshard.load_resharded(eng, folder / "ds", rank, world)
    else:
        checkpoints.install_weights_only_loader(eng)
        eng.load_checkpoint(str(folder), tag="ds")
    return eng

for variant in variants:
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
        eng = resume(model, make, variant, src)
        save(eng, model, variant, stage, base / f"resumed_{run}")  # what the resume holds, before any step
        train(eng, range(3, 5) if run == "second" else range(5, 7))
        ref = full_weights(model, variant, stage)
        if rank == 0:
            want = torch.load(base / ("after1.pt" if run == "second" else "after2.pt"))
            worst = max((ref[k].float() - want[k].float()).abs().max().item() for k in want)
            assert worst < 1e-5, f"{variant} {run}: training after the resume differs by {worst}"
        if run == "second":  # checkpoint 2 (written by this count) and its reference
            save(eng, model, variant, stage, base / "ckpt2")
            train(eng, range(5, 7))
            ref = full_weights(model, variant, stage)
            if rank == 0:
                torch.save(ref, base / "after2.pt")
    eng.destroy()
    print(f"rank {rank}: {variant} {run} ok", flush=True)
"""


def run_ranks(tmp_path: Path, world: int, run: str, variants: tuple[str, ...], env_extra: dict | None = None,
              timeout: int = 300) -> list[str]:
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS_SCRIPT)
    store = tmp_path / f"rendezvous_{run}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "GLOBAL_BATCH": str(GLOBAL_BATCH),
           **(env_extra or {})}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(store), str(tmp_path), run,
                               ",".join(variants)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env) for r in range(world)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [out for out in outs if out] if all(p.returncode == 0 for p in procs) else \
        pytest.fail(f"{run} run on {world} ranks failed:\n" + "\n".join(o[-3000:] for o in outs))


def assert_same_state(written: Path, resumed: Path, what: str) -> None:
    """The state a resumed engine saves before any step equals the checkpoint it resumed from: weights, and every
    trained parameter's fp32 copy and optimizer moments, steps, hyperparameters, schedule and counters."""
    if written_world_size(written / "ds") is None:  # ZeRO-0: one file, DeepSpeed's own layout on any count
        a, b = (checkpoints.safe_torch_load(f / "ds" / "mp_rank_00_model_states.pt") for f in (written, resumed))
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
        for i, s in a["optimizer"]["state"].items():
            for key, v in s.items():
                assert torch.equal(v, b["optimizer"]["state"][i][key]), (what, i, key)
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
        if (written / "model.pt").exists():  # fp32 training: the master copy is the weights (checks the reader)
            weights = checkpoints.safe_torch_load(written / "model.pt", deepspeed_types=False)
            for name in a.numel:
                assert torch.equal(a.full(name, "fp32"), weights[name].reshape(-1)), (what, name)
    if (written / "model.pt").exists():
        wa, wb = (checkpoints.safe_torch_load(f / "model.pt", deepspeed_types=False) for f in (written, resumed))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), what


def two_one_two(tmp_path: Path, worlds: tuple[int, int, int], variants: tuple[str, ...] = VARIANTS,
                env_extra: dict | None = None) -> None:
    first, second, third = worlds
    run_ranks(tmp_path, first, "first", variants, env_extra)
    run_ranks(tmp_path, second, "second", variants, env_extra)
    run_ranks(tmp_path, third, "third", variants, env_extra)
    for v in variants:
        base = tmp_path / v
        if v != "zero0":
            assert written_world_size(base / "ckpt1" / "ds") == first
            assert written_world_size(base / "ckpt2" / "ds") == second
        assert_same_state(base / "ckpt1", base / "resumed_second", f"{v}: {first} -> {second}")
        assert_same_state(base / "ckpt2", base / "resumed_third", f"{v}: {second} -> {third}")
        if v == "partitions":
            parts = sorted(p.name for p in (base / "resumed_second").glob("model_partition_rank*.pt"))
            assert len(parts) == second, parts


def test_every_zero_stage_resumes_two_workers_on_one_and_back(tmp_path):
    """2 -> 1 -> 2 for ZeRO-0, 1, 2, 3 and ZeRO-3 partitions: the state after each resume equals the checkpoint's,
    and the steps that follow equal the uninterrupted run's."""
    two_one_two(tmp_path, (2, 1, 2))


@pytest.mark.slow
def test_uneven_counts_three_to_two_to_four(tmp_path):
    """3 -> 2 -> 4: slices that do not divide the parameters evenly, padding moving between ranks."""
    two_one_two(tmp_path, (3, 2, 4))


def test_a_resume_on_another_count_is_refused_with_the_seam_off(tmp_path):
    """FORGETLESS_PUBLIC_PATHS=1 (or another DeepSpeed version): the re-shard is refused with a reason, not guessed."""
    run_ranks(tmp_path, 2, "first", ("zero1",), {PUBLIC_PATHS_VARIABLE: "1"})
    script = tmp_path / "ranks.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "GLOBAL_BATCH": str(GLOBAL_BATCH), PUBLIC_PATHS_VARIABLE: "1"}
    out = subprocess.run([sys.executable, str(script), "0", "1", str(tmp_path / "rv"), str(tmp_path), "second",
                          "zero1"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    assert "re-shards only DeepSpeed 0.19" in out.stdout + out.stderr, (out.stdout + out.stderr)[-2000:]
