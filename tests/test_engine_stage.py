"""A run that only ever has one worker trains its ZeRO-1/2 configuration with a ZeRO-0 engine (engine_zero_stage):
nothing to partition, and none of ZeRO-1/2's flat-buffer copies. Which runs do (the rule), what the run's start line
says, and that the training is the same: the same weights after the same steps as a real ZeRO-2 engine, with
gradient accumulation and clipping. Real DeepSpeed engines, one gloo rank in a subprocess (no process group leaks
into pytest)."""
from __future__ import annotations

import json
from types import MethodType, SimpleNamespace

import pytest

from forgetless.config import load_config
from forgetless.config_sections import DeepSpeedSpec
from forgetless.platform.driver.fits import describe_zero
from forgetless.platform.worker.checkpoint_io import DS_TAG
from forgetless.platform.worker.engine import engine_zero_stage
from forgetless.platform.worker.train_loop import engine_batch
from forgetless.platform.worker.worker_run import WorkerRun
from conftest import ONE_RANK_DEEPSPEED_PRELUDE, ONE_RANK_FINETUNE, ONE_RANK_MLP_CONFIG, run_one_rank_script


@pytest.mark.parametrize("spec, counts, use_gpu, stage", [
    ({"zero_stage": 2}, range(1, 2), False, 0),
    ({"zero_stage": 1}, range(1, 2), False, 0),
    ({"zero_stage": 0}, range(1, 2), False, 0),
    ({"zero_stage": 2}, range(2, 3), False, 2),  # two workers: partitions
    ({"zero_stage": 2}, range(1, 3), False, 2),  # elastic: its checkpoints may be read on two
    ({"zero_stage": 2}, range(1, 2), True, 2),  # GPU: bf16 (ZeRO-0 would train through another optimizer wrapper)
    ({"zero_stage": 2, "precision": "bf16"}, range(1, 2), False, 2),
    ({"zero_stage": 2, "offload_optimizer": "cpu"}, range(1, 2), False, 2),  # ZeRO-Offload is what it is for
    ({"zero_stage": 3}, range(1, 2), False, 3),
])
def test_which_runs_train_at_zero_0(spec, counts, use_gpu, stage):
    assert engine_zero_stage(DeepSpeedSpec(**spec), counts, use_gpu) == stage


def test_the_runs_start_line_says_the_stage_it_runs_at():
    base = {"name": "z", "source": {"dataset": "digits", "classes": [0, 1]},
            "targets": [{"dataset": "digits", "classes": [2, 3]}], "strategies": ["finetune"]}
    one = load_config({**base, "scaling": {"num_workers": 1}, "deepspeed": {"zero_stage": 2}})
    assert describe_zero(one) == "DeepSpeed ZeRO-2, run as ZeRO-0: one worker has nothing to partition"
    assert describe_zero(load_config({**base, "scaling": {"num_workers": 2}})) == "DeepSpeed ZeRO-2"


def test_a_phase_resuming_zero_1_2_optimizer_shards_keeps_the_configured_stage(tmp_path):
    # A one-worker ZeRO-2 run interrupted before the rule, resumed after it: its checkpoint holds ZeRO-2's optimizer
    # shard, which only a ZeRO-2 engine reads; the phases after it (fresh optimizers) train at ZeRO-0.
    cfg = load_config({"name": "z", "source": {"dataset": "digits", "classes": [0, 1]},
                       "targets": [{"dataset": "digits", "classes": [2, 3]}], "strategies": ["finetune"],
                       "scaling": {"num_workers": 1}, "deepspeed": {"zero_stage": 2}})
    run = SimpleNamespace(job=SimpleNamespace(config=cfg, optim=cfg.train, use_gpu=False), world=1, resume_dir=None,
                          state=SimpleNamespace(epoch=2))
    run.batch_plan = MethodType(WorkerRun.batch_plan, run)
    assert engine_batch(run)[1].zero_stage == 0  # nothing to resume
    zero0, zero2 = tmp_path / "zero0", tmp_path / "zero2"
    (zero0 / DS_TAG).mkdir(parents=True)
    (zero0 / DS_TAG / "mp_rank_00_model_states.pt").write_bytes(b"")
    (zero2 / DS_TAG).mkdir(parents=True)
    (zero2 / DS_TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    run.resume_dir = str(zero0)
    assert engine_batch(run)[1].zero_stage == 0
    run.resume_dir = str(zero2)
    assert engine_batch(run)[1].zero_stage == 2
    run.state.epoch = 0  # resumed at a phase's start: no optimizer state is read
    assert engine_batch(run)[1].zero_stage == 0


_SCRIPT = ONE_RANK_DEEPSPEED_PRELUDE + ONE_RANK_FINETUNE + r"""
out = {}
for stage in (2, 0):
    engine, out[stage] = finetune_eight_micro_batches(cfg.deepspeed.model_copy(update={"zero_stage": stage}))
    out[stage]["zero_optimizer"] = type(engine.optimizer).__name__
print("RESULT " + json.dumps(out), flush=True)
"""


def test_a_zero_0_engine_trains_the_same_weights_as_zero_2_on_one_rank(tmp_path):
    cfg = {**ONE_RANK_MLP_CONFIG, "deepspeed": {"gradient_accumulation_steps": 2, "gradient_clipping": 0.5}}
    (r,) = run_one_rank_script(tmp_path, _SCRIPT, json.dumps(cfg))
    zero2, zero0 = r["2"], r["0"]
    assert zero2["zero_optimizer"] == "DeepSpeedZeroOptimizer" and zero0["zero_optimizer"] != zero2["zero_optimizer"]
    assert zero2["updates"] == zero0["updates"] == 4  # 8 micro-batches, accumulation 2
    assert zero0["moved"] > 1e-3  # it trained
    for name, values in zero2["weights"].items():
        assert max(abs(a - b) for a, b in zip(values, zero0["weights"][name], strict=True)) < 1e-5, name
