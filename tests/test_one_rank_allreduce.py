"""A ZeRO-0 engine of one rank skips DeepSpeed's gradient all-reduce (issue 30, item 5: it flattened, averaged over
one rank and copied back every gradient, ~5 % of a 10 M decoder's step on CPU). Over one rank the all-reduce changes
nothing, so the skip must change nothing either: the same weights after the same steps, with gradient accumulation,
next to an engine that all-reduces (the seam off: FORGETLESS_PUBLIC_PATHS=1). Real DeepSpeed engines, one gloo rank in
a subprocess each (no process group leaks into pytest)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ONE_RANK_DEEPSPEED_PRELUDE

_SCRIPT = ONE_RANK_DEEPSPEED_PRELUDE + r"""
from forgetless.strategies.base import task_infos
infos = task_infos(tasks)
strategy = make_strategy("finetune", {}, 1, cfg.train.lr)
model = build_model(cfg, infos, strategy)
phase = strategy.phases(model, infos[1])[-1]
set_trainable(model, phase)
engine = make_engine(model, phase, cfg.train, cfg.deepspeed, 1, False)
set_train_mode(model, phase)
access = weight_access(model, 0)
before = {k: v.clone() for k, v in full_state_dict(model, 0).items()}
updates = 0
for i in range(0, 128, 16):
    x, y = tasks[1].x_train[i:i + 16], tasks[1].y_train[i:i + 16]
    updates += train_step(engine, model, strategy, phase, infos[1], x, y, torch.Generator(), access)[1]
full = full_state_dict(model, 0)
moved = max(float((full[k] - before[k]).abs().max()) for k in full)
print("RESULT " + json.dumps({"allreduce": engine.enable_backward_allreduce, "updates": updates, "moved": moved,
                              "weights": {k: v.flatten().tolist() for k, v in full.items()}}), flush=True)
"""


def _train(tmp_path, public_paths: bool) -> dict:
    cfg = {"name": "z", "source": {"dataset": "digits", "classes": [0, 1, 2]},
           "targets": [{"dataset": "digits", "classes": [3, 4]}],
           "backbone": {"name": "mlp", "params": {"hidden": [16]}}, "strategies": ["finetune"],
           "train": {"lr": 0.05, "batch_size": 16, "optimizer": "adamw"},
           "deepspeed": {"zero_stage": 0, "gradient_accumulation_steps": 2}}
    script = tmp_path / "one_rank.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FORGETLESS_PUBLIC_PATHS": "1" if public_paths else "0"}
    out = subprocess.run([sys.executable, str(script), json.dumps(cfg)], capture_output=True, text=True, timeout=600,
                         check=False, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def test_one_rank_zero0_skips_the_allreduce_and_trains_the_same_weights(tmp_path):
    skipped, reduced = _train(tmp_path, public_paths=False), _train(tmp_path, public_paths=True)
    assert skipped["allreduce"] is False and reduced["allreduce"] is True
    assert skipped["updates"] == reduced["updates"] == 4  # 8 micro-batches, accumulation 2
    assert skipped["weights"].keys() == reduced["weights"].keys()
    for name, values in skipped["weights"].items():
        assert values == reduced["weights"][name], name  # bit for bit: a sum of one, divided by one
    assert skipped["moved"] > 1e-3  # it trained: equal weights are not two runs that did nothing
