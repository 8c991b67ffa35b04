"""A ZeRO-0 engine of one rank skips DeepSpeed's gradient all-reduce (issue 30, item 5: it flattened, averaged over
one rank and copied back every gradient, ~5 % of a 10 M decoder's step on CPU). Over one rank the all-reduce changes
nothing, so the skip must change nothing either: the same weights after the same steps, with gradient accumulation,
next to an engine that all-reduces (the seam off: FORGETLESS_PUBLIC_PATHS=1). Real DeepSpeed engines, one gloo rank in
a subprocess each (no process group leaks into pytest)."""
from __future__ import annotations

import json

from conftest import ONE_RANK_DEEPSPEED_PRELUDE, ONE_RANK_FINETUNE, ONE_RANK_MLP_CONFIG, run_one_rank_script

_SCRIPT = ONE_RANK_DEEPSPEED_PRELUDE + ONE_RANK_FINETUNE + r"""
engine, result = finetune_eight_micro_batches(cfg.deepspeed)
print("RESULT " + json.dumps({"allreduce": engine.enable_backward_allreduce, **result}), flush=True)
"""


def _train(tmp_path, public_paths: bool) -> dict:
    cfg = {**ONE_RANK_MLP_CONFIG, "deepspeed": {"zero_stage": 0, "gradient_accumulation_steps": 2}}
    (result,) = run_one_rank_script(tmp_path, _SCRIPT, json.dumps(cfg),
                                    env={"FORGETLESS_PUBLIC_PATHS": "1" if public_paths else "0"})
    return result


def test_one_rank_zero0_skips_the_allreduce_and_trains_the_same_weights(tmp_path):
    skipped, reduced = _train(tmp_path, public_paths=False), _train(tmp_path, public_paths=True)
    assert skipped["allreduce"] is False and reduced["allreduce"] is True
    assert skipped["updates"] == reduced["updates"] == 4  # 8 micro-batches, accumulation 2
    assert skipped["weights"].keys() == reduced["weights"].keys()
    for name, values in skipped["weights"].items():
        assert values == reduced["weights"][name], name  # bit for bit: a sum of one, divided by one
    assert skipped["moved"] > 1e-3  # it trained: equal weights are not two runs that did nothing
