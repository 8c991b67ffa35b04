"""The cost of one language-model fine-tuning step under forgetless against the same step in a plain transformers (+
PEFT) training loop, in the same process, interleaved.

    python benchmarks/lm_step_cost.py --model models/prose-gpt2 --rounds 8 --steps 5
    python benchmarks/lm_step_cost.py --model models/prose-gpt2 --method finetune

- `forgetless`: the platform's path, as a worker runs it: `build_model` (the `hf:` backbone with the per-task
  vocabulary bias, the strategy's surgery: PEFT LoRA layers for `lora`), the strategy's phase, a DeepSpeed engine
  (`make_engine`, ZeRO stage `--zero`, one rank, gloo) and `train_step` (forward, the task kind's loss, backward, step);
- `plain`: `AutoModelForCausalLM.from_pretrained` (+ `peft.get_peft_model` with the same LoRA settings),
  `torch.optim.AdamW(fused=True)` (Hugging Face Trainer's default) on the same trainable parameters, and `model(input_ids, labels=input_ids)`, `loss.backward()`,
  `clip_grad_norm_` (at `--clip`, as forgetless's engine clips), `optimizer.step()`, `optimizer.zero_grad()`.

Both train on the same random token blocks (batch x block_size), at the same learning rate, from the same weights.
Rounds alternate the order (A B, B A, ...) so drift of a shared machine falls on both; the first round is warm-up and
not counted. Reported: the median step time of each and their ratio (forgetless / plain; the issue's goal: <= 1.05),
with every round's ratio. One process, so the "same processes" of the issue: one rank of each.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

LORA = {"r": 8, "alpha": 16, "target_modules": ["c_attn", "c_proj", "c_fc"]}


def forgetless_stepper(folder: str, method: str, lr: float, batch: int, block: int, zero: int, world: int,
                       clip: float, ds_extra: dict | None = None):
    from forgetless.config import load_config
    from forgetless.data.kinds import CAUSAL_LM
    from forgetless.platform.worker.engine import engine_zero_stage, make_engine, weight_access
    from forgetless.platform.worker.model_io import build_model
    from forgetless.strategies import make_strategy
    from forgetless.strategies.base import TaskInfo
    from forgetless.strategies.training import set_train_mode, train_step

    params = LORA if method == "lora" else {}
    task = {"kind": "causal_lm", "dataset": "prose", "block_size": block}
    cfg = load_config({"name": "bench", "source": {**task, "name": "a"}, "targets": [{**task, "name": "b"}],
                       "backbone": {"name": f"hf:{folder}"}, "strategies": [{"name": method, "params": params}],
                       "train": {"optimizer": "adamw", "lr": lr, "batch_size": batch},
                       "scaling": {"num_workers": world},
                       "deepspeed": {"zero_stage": zero, "gradient_clipping": clip, "extra": ds_extra or {}}})
    # the stage a run of `world` workers trains at (a one-worker ZeRO-1/2 run: ZeRO-0), as the train loop picks it
    spec = cfg.deepspeed.model_copy(update={"zero_stage": engine_zero_stage(cfg.deepspeed,
                                                                             cfg.scaling.worker_counts(), False)})
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    infos = [TaskInfo(i, n, vocab, [], (1, block), CAUSAL_LM) for i, n in enumerate("ab")]
    strategy = make_strategy(method, params, 1, lr)
    model = build_model(cfg, infos, strategy)
    phase = strategy.phases(model, infos[1])[-1]
    engine = make_engine(model, phase, cfg.train, spec, world, False)
    set_train_mode(model, phase)
    access = weight_access(model, spec.zero_stage)

    def step(ids: torch.Tensor) -> float:
        return train_step(engine, model, strategy, phase, infos[1], ids[:, None].float(), ids, torch.Generator(),
                          access)[0]

    step.engine_stage = spec.zero_stage
    return step


def plain_stepper(folder: str, method: str, lr: float, world: int, clip: float, sharded: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                                 target_modules=LORA["target_modules"], lora_dropout=0.0))
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    # fused: Hugging Face Trainer's default optimizer on torch >= 2.8 (`adamw_torch_fused`), as forgetless's engines
    if sharded:  # each rank steps and keeps the optimizer state of its share of the weights: PyTorch's own ZeRO-1
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optimizer = ZeroRedundancyOptimizer(trained, optimizer_class=torch.optim.AdamW, lr=lr, weight_decay=0.0,
                                            fused=True)
    else:
        optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0, fused=True)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)

    def step(ids: torch.Tensor) -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if clip > 0:  # as Hugging Face Trainer does with max_grad_norm (after DDP's all-reduce: the global norm)
            torch.nn.utils.clip_grad_norm_(trained, clip)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    return step


def timed(step, batches: list[torch.Tensor]) -> list[float]:
    out = []
    for ids in batches:
        if torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()  # every rank starts the step together: a step's time is the slowest rank's
        t0 = time.perf_counter()
        step(ids)
        out.append(time.perf_counter() - t0)
    return out


def measure(rank: int, args: argparse.Namespace, port: int) -> dict | None:
    """One rank's side of the measurement (every rank runs this; rank 0 returns the result)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.ranks), MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    folder = str(Path(args.model).resolve())
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(rank)  # each rank its own data, as data parallelism has it
    batches = [torch.randint(0, vocab, (args.batch, args.block), generator=g) for _ in range(args.steps)]
    steppers = {f"forgetless_zero{z}": forgetless_stepper(folder, args.method, args.lr, args.batch, args.block, z,
                                                          args.ranks, args.clip) for z in args.zero}
    if args.ds_extra:  # the same stages again with the extra DeepSpeed settings, interleaved with the rest
        extra = json.loads(args.ds_extra)
        steppers.update({f"forgetless_zero{z}_extra": forgetless_stepper(folder, args.method, args.lr, args.batch,
                                                                         args.block, z, args.ranks, args.clip,
                                                                         extra)
                         for z in args.zero})
    steppers["plain"] = plain_stepper(folder, args.method, args.lr, args.ranks, args.clip)
    if args.plain_sharded:
        steppers["plain_sharded"] = plain_stepper(folder, args.method, args.lr, args.ranks, args.clip, sharded=True)
    names = list(steppers)
    plains = [name for name in names if name.startswith("plain")]
    times: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names if name not in plains}
    sharded_ratios: dict[str, list[float]] = {name: [] for name in ratios if "plain_sharded" in steppers
                                              and steppers[name].engine_stage in (1, 2)}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        this = {name: timed(steppers[name], batches) for name in order}
        if r == 0:
            continue  # warm-up
        for name in names:
            times[name] += this[name]
        for name in ratios:
            ratios[name].append(statistics.median(this[name]) / statistics.median(this["plain"]))
        for name in sharded_ratios:
            sharded_ratios[name].append(statistics.median(this[name]) / statistics.median(this["plain_sharded"]))
    torch.distributed.barrier()
    if rank != 0:
        return None
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"method": args.method, "ranks": args.ranks, "zero": args.zero, "ds_extra": args.ds_extra, "clip": args.clip,
            "batch": args.batch, "block": args.block,
            "threads": args.threads, "rounds": args.rounds - 1, "steps_per_round": args.steps,
            "plain": "DistributedDataParallel (gloo)" if args.ranks > 1 else "one process",
            "median_step_s": med, "min_step_s": {name: min(v) for name, v in times.items()},
            "ratio_median": {name: med[name] / med["plain"] for name in ratios},
            "ratio_of_round_medians": {name: {"min": min(v), "median": statistics.median(v)}
                                       for name, v in ratios.items()},
            "round_ratios": ratios,
            "engine_stage": {name: st.engine_stage for name, st in steppers.items() if name not in plains},
            # ZeRO-1/2 against DDP with PyTorch's ZeroRedundancyOptimizer (--plain-sharded): a plain loop that also
            # partitions the optimizer state
            "ratio_to_sharded_plain": {name: {"min": min(v), "median": statistics.median(v)}
                                       for name, v in sharded_ratios.items()},
            "plain_optimizer": "AdamW(fused=True)"}


def spawned(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    result = measure(rank, args, port)
    if result is not None:
        Path(out).write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/prose-gpt2")
    ap.add_argument("--method", choices=["lora", "finetune"], default="lora")
    ap.add_argument("--rounds", type=int, default=8, help="rounds of each (the first is warm-up)")
    ap.add_argument("--steps", type=int, default=5, help="steps per round")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch per rank")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--zero", type=int, nargs="+", default=[2], help="ZeRO stages of the forgetless side, each "
                                                                      "measured interleaved with the others")
    ap.add_argument("--ranks", type=int, default=1, help="data-parallel processes (gloo); the plain side uses "
                                                         "DistributedDataParallel when > 1")
    ap.add_argument("--ds-extra", default=None, help="JSON of DeepSpeed settings (deepspeed.extra): each ZeRO stage is "
                                                     "measured with and without them, interleaved")
    ap.add_argument("--plain-sharded", action="store_true",
                    help="with --ranks > 1: also time the plain loop with PyTorch's ZeroRedundancyOptimizer (the "
                         "optimizer state partitioned, as ZeRO-1/2), the ZeRO-1/2 rows' ratio to it recorded too")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--clip", type=float, default=1.0,
                    help="gradient-norm clipping on both sides (default 1.0: forgetless's deepspeed.gradient_clipping "
                         "default, Hugging Face Trainer's max_grad_norm); 0: none")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per rank")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args()
    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if args.ranks == 1:
        result = measure(0, args, port)
    else:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as d:
            mp.spawn(spawned, args=(args, port, f"{d}/result.json"), nprocs=args.ranks, join=True)
            result = json.loads(Path(d, "result.json").read_text())
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
