"""A run that only ever has one worker trains its ZeRO-1/2 configuration with a ZeRO-0 engine (engine_zero_stage):
nothing to partition, and none of ZeRO-1/2's flat-buffer copies. Which runs do (the rule), what the run's start line
says, and that the training is the same: the same weights after the same steps as a real ZeRO-2 engine, with
gradient accumulation and clipping. Real DeepSpeed engines, one gloo rank in a subprocess (no process group leaks
into pytest)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from forgetless.config import load_config
from forgetless.config_sections import DeepSpeedSpec
from forgetless.platform.driver.fits import describe_zero
from forgetless.platform.worker.engine import engine_zero_stage
from conftest import ONE_RANK_DEEPSPEED_PRELUDE


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


_SCRIPT = ONE_RANK_DEEPSPEED_PRELUDE + r"""
from forgetless.strategies.base import task_infos
infos = task_infos(tasks)
out = {}
for stage in (2, 0):
    torch.manual_seed(0)
    strategy = make_strategy("finetune", {}, 1, cfg.train.lr)
    model = build_model(cfg, infos, strategy)
    phase = strategy.phases(model, infos[1])[-1]
    set_trainable(model, phase)
    spec = cfg.deepspeed.model_copy(update={"zero_stage": stage})
    engine = make_engine(model, phase, cfg.train, spec, 1, False)
    set_train_mode(model, phase)
    access = weight_access(model, stage)
    before = {k: v.clone() for k, v in full_state_dict(model, 0).items()}
    updates = 0
    for i in range(0, 128, 16):
        x, y = tasks[1].x_train[i:i + 16], tasks[1].y_train[i:i + 16]
        updates += train_step(engine, model, strategy, phase, infos[1], x, y, torch.Generator(), access)[1]
    full = full_state_dict(model, 0)
    out[stage] = {"zero_optimizer": type(engine.optimizer).__name__, "updates": updates,
                  "moved": max(float((full[k] - before[k]).abs().max()) for k in full),
                  "weights": {k: v.flatten().tolist() for k, v in full.items()}}
print("RESULT " + json.dumps(out), flush=True)
"""


def test_a_zero_0_engine_trains_the_same_weights_as_zero_2_on_one_rank(tmp_path):
    cfg = {"name": "z", "source": {"dataset": "digits", "classes": [0, 1, 2]},
           "targets": [{"dataset": "digits", "classes": [3, 4]}],
           "backbone": {"name": "mlp", "params": {"hidden": [16]}}, "strategies": ["finetune"],
           "train": {"lr": 0.05, "batch_size": 16, "optimizer": "adamw"},
           "deepspeed": {"gradient_accumulation_steps": 2, "gradient_clipping": 0.5}}
    script = tmp_path / "stages.py"
    script.write_text(_SCRIPT)
    out = subprocess.run([sys.executable, str(script), json.dumps(cfg)], capture_output=True, text=True, timeout=600,
                         check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    r = json.loads(line[len("RESULT "):])
    zero2, zero0 = r["2"], r["0"]
    assert zero2["zero_optimizer"] == "DeepSpeedZeroOptimizer" and zero0["zero_optimizer"] != zero2["zero_optimizer"]
    assert zero2["updates"] == zero0["updates"] == 4  # 8 micro-batches, accumulation 2
    assert zero0["moved"] > 1e-3  # it trained
    for name, values in zero2["weights"].items():
        assert max(abs(a - b) for a, b in zip(values, zero0["weights"][name], strict=True)) < 1e-5, name
