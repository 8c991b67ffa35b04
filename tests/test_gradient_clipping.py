"""`deepspeed.gradient_clipping` means what its description says: 0 trains without clipping, the default clips the
global gradient norm at 1.0. (DeepSpeed clips at 1.0 where its config has no `gradient_clipping` key; forgetless once
left the key out for 0, so every run was clipped.) Real DeepSpeed engines at ZeRO-0 and ZeRO-2, one gloo rank in a
subprocess (no process group leaks into pytest), against the same steps in plain PyTorch."""
from __future__ import annotations

from conftest import run_one_rank_script

_SCRIPT = r"""
import json, os, torch
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT="0", RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
torch.set_num_threads(1)
import deepspeed
from forgetless.config_sections import DeepSpeedSpec
from forgetless.platform.worker.engine import deepspeed_config
deepspeed.init_distributed(dist_backend="gloo")

def model():
    torch.manual_seed(0)
    return torch.nn.Linear(6, 3)

g = torch.Generator().manual_seed(1)
batches = [(torch.randn(4, 6, generator=g) * 10, torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]
loss_fn = torch.nn.CrossEntropyLoss()

def plain(clip):
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    norms = []
    for x, y in batches:
        opt.zero_grad()
        loss_fn(m(x), y).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(m.parameters(), clip if clip > 0 else float("inf"))))
        opt.step()
    return [p.detach().flatten().tolist() for p in m.parameters()], norms

out = {"default": DeepSpeedSpec().gradient_clipping}
for zero in (0, 2):
    for clip in (0.0, 1.0):
        m = model()
        cfg = deepspeed_config(DeepSpeedSpec(zero_stage=zero, gradient_clipping=clip), 4, 1, False)
        engine, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), config=cfg)
        for x, y in batches:
            engine.backward(loss_fn(engine(x), y))
            engine.step()
        out[f"zero{zero}_clip{clip}"] = [p.detach().flatten().tolist() for p in engine.module.parameters()]
for clip in (0.0, 1.0):
    out[f"plain_clip{clip}"], out["norms"] = plain(clip)
print("RESULT " + json.dumps(out), flush=True)
"""


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(u - v) for pa, pb in zip(a, b, strict=True) for u, v in zip(pa, pb, strict=True))


def test_zero_clipping_trains_unclipped_and_the_default_clips_at_one(tmp_path):
    (r,) = run_one_rank_script(tmp_path, _SCRIPT)
    assert r["default"] == 1.0
    assert min(r["norms"]) > 2.0  # every step's gradient is above the clip: clipping changes every step
    assert _max_diff(r["plain_clip0.0"], r["plain_clip1.0"]) > 1e-2  # so clipped and unclipped training differ
    for zero in (0, 2):
        for clip in ("0.0", "1.0"):
            assert _max_diff(r[f"zero{zero}_clip{clip}"], r[f"plain_clip{clip}"]) < 1e-5, (zero, clip)
