"""Peak memory per worker of fine-tuning a Hugging Face decoder under ZeRO-3: construction, a training step, a
checkpoint, a resume and the export, with 1, 2, 4... workers, before (the model built whole on every rank and
gathered whole at checkpoints and exports: forgetless before issue 15, and still what strategies that are not
`works_on_partitions` get) and after (partitioned from construction to the export).

    python benchmarks/memory.py                                  # ~0.3B decoder, CPU, 1/2/4 workers, both modes
    python benchmarks/memory.py --size 1b --workers 2 --modes after --optimizer sgd   # ~1B trains/checkpoints/
                                                                 # resumes/exports with 2 workers (CPU)
    python benchmarks/memory.py --gpu --size 1b --workers 1 --precision bf16           # GPU: adds peak GPU memory

Each worker is a real DeepSpeed rank (gloo on CPU, nccl on GPU) running the same engine functions the train loop
runs in that mode (forgetless.platform.worker.engine), without Ray, so that every byte measured is the model's: a thread
samples the process's resident set size (RSS) every 5 ms and each stage reports its peak. The model is a Llama-style
decoder with random weights from its config, saved once as a sharded safetensors folder in the cache
($FORGETLESS_CACHE or ~/.cache/forgetless, `bench-models/`), read back shard by shard as any `hf:` folder.
The resume runs in a second set of fresh processes, as Ray Train restarts lost workers (a resume inside the process
that trained would measure that process's leftovers, not the resume). Per-worker peak = the largest of any rank's
stage peaks. Model-state bytes per worker (fp32 Adam): weights 4 +
fp32 partition 4 + gradients 4 + Adam moments 8 = 20 bytes per parameter under ZeRO-3, divided by the workers (SGD
without momentum: 12). The rest of a worker's peak is the constant: Python, torch, DeepSpeed and transformers
(measured before construction as `base_gb`) plus activations and communication buffers.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZES = {  # Llama-style decoders (AutoModel: no LM head); params counted from the built model
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000),
    "0.3b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20, num_attention_heads=16,
                 vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18, num_attention_heads=16,
               num_key_value_heads=16, vocab_size=32000),
}
STAGES = ("construction", "step", "checkpoint", "resume", "export")
BUCKET = 20_000_000  # elements (80 MB in fp32)
SEQ, BATCH = 16, 1  # tokens per sample, samples per step: activations stay negligible next to the model states
OUT = Path(__file__).parent / "results" / "memory.json"


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def model_folder(size: str) -> Path:
    """The decoder's folder (random weights, sharded safetensors), made once and reused."""
    root = Path(os.environ.get("FORGETLESS_CACHE", Path.home() / ".cache" / "forgetless")) / "bench-models"
    folder = root / f"llama-{size}"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaModel

    say(f"writing {folder} (once)")
    torch.manual_seed(0)
    LlamaModel(LlamaConfig(max_position_embeddings=64, **SIZES[size])).save_pretrained(folder, max_shard_size="200MB")
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# one worker (a subprocess per rank)


class PeakSampler:
    """Peak RSS (and peak GPU memory) of this process per stage, sampled by a thread."""

    def __init__(self, gpu: bool):
        import threading

        import psutil

        self.proc, self.gpu, self.peak, self.stop = psutil.Process(), gpu, 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def stage(self) -> dict[str, float]:
        """The peak since the last call (then starts a new stage)."""
        import torch

        rss = max(self.peak, self.proc.memory_info().rss)
        self.peak = self.proc.memory_info().rss
        out = {"rss_gb": rss / 1e9}
        if self.gpu:
            out["gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
            torch.cuda.reset_peak_memory_stats()
        return out


def worker(args: argparse.Namespace) -> None:
    rank, world = args.rank, args.world
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if not args.gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import torch

    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before any stage is measured)
    from forgetless.backbones import TransferModel, build_backbone
    from forgetless.config import DeepSpeedSpec, OptimConfig
    from forgetless.platform.worker import checkpoints
    from forgetless.platform.worker import engine as ds
    from forgetless.platform.worker import zero3_partitions as z3

    torch.set_num_threads(args.threads)
    deepspeed.init_distributed(dist_backend="nccl" if args.gpu else "gloo")
    if args.gpu:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if args.gpu else torch.device("cpu")
    sampler = PeakSampler(args.gpu)
    # DeepSpeed's default gradient-reduction bucket is 5e8 elements (2 GB in fp32) whatever the model: a bounded
    # bucket (as `deepspeed.extra` sets it on a cluster) keeps that constant from hiding the model states
    spec = DeepSpeedSpec(zero_stage=3, precision=args.precision, extra={"zero_optimization": {
        "reduce_bucket_size": BUCKET, "stage3_prefetch_bucket_size": BUCKET}})
    optim = OptimConfig(optimizer=args.optimizer, batch_size=BATCH, lr=1e-4, momentum=0.0)
    cfg = ds.deepspeed_config(spec, BATCH, world, args.gpu)
    after = args.mode == "after"
    result: dict = {"rank": rank, "base_gb": sampler.stage()["rss_gb"]}
    ckpt = Path(args.scratch) / "ckpt"

    def build():
        from contextlib import nullcontext

        with z3.partitioned_construction(cfg) if after else nullcontext():
            model = TransferModel(build_backbone(f"hf:{args.folder}", (2, SEQ)), [2], seed=0)
        return model.to(device)

    def engine(model):
        from forgetless.strategies.base import ParamGroup, Phase

        return ds.make_engine(model, Phase("ft", 1, [ParamGroup("all", list(model.parameters()), 1e-4)]), optim,
                              spec, world, args.gpu)

    def step(eng):
        g = torch.Generator().manual_seed(rank)
        x = torch.stack([torch.randint(1, 1000, (BATCH, SEQ), generator=g), torch.ones(BATCH, SEQ, dtype=torch.long)], 1)
        loss = torch.nn.functional.cross_entropy(eng(x.float().to(device), 0).float(),
                                                 torch.zeros(BATCH, dtype=torch.long, device=device))
        eng.backward(loss)
        eng.step()
        return float(loss)

    t0 = time.time()
    model = build()
    result["params"] = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    result["construction"] = sampler.stage()
    if args.part == "resume":  # a fresh process, as after a lost worker: the checkpoint the first part wrote
        if after:
            z3.load_partition_state(model, checkpoints.safe_torch_load(ckpt / f"part{rank}.pt",
                                                                       deepspeed_types=False))
        else:
            model.load_state_dict(checkpoints.safe_torch_load(ckpt / "model.pt", map_location="cpu",
                                                              deepspeed_types=False))
        eng = engine(model)
        checkpoints.install_weights_only_loader(eng)
        eng.load_checkpoint(str(ckpt), tag="ds")
        result["loss_after_resume"] = step(eng)
        result["resume"] = sampler.stage()
        result["resume_seconds"] = time.time() - t0
        Path(args.scratch, f"rank{rank}-resume.json").write_text(json.dumps(result))
        return
    eng = engine(model)
    result["loss"] = step(eng)
    result["step"] = sampler.stage()
    eng.save_checkpoint(str(ckpt), tag="ds")  # DeepSpeed's own shards: every rank, both modes
    if after:  # each rank's weight partition
        torch.save(z3.partition_state(model), ckpt / f"part{rank}.pt")
    else:  # the consolidated model.pt, gathered whole on every rank under ZeRO-3 (rank 0 keeps the copy)
        state = ds.consolidated_state_dict(model, 3, rank)
        if rank == 0:
            torch.save(state, ckpt / "model.pt")
        del state
    torch.distributed.barrier()
    result["checkpoint"] = sampler.stage()
    engines = [eng]  # the only reference left: export drops it, as the train loop does at the end of a phase
    del eng
    export(result, args, rank, model, engines, build, ds, sampler)
    result["seconds"] = time.time() - t0
    Path(args.scratch, f"rank{rank}.json").write_text(json.dumps(result))


def export(result: dict, args, rank: int, model, engines: list, build, ds, sampler) -> None:
    """The end of a run. Before: the engine is released by gathering the whole model on every rank and rebuilding
    it (as between phases), then rank 0 writes model.pt. After: the engine goes, the partitions stay; rank 0 gathers
    one parameter at a time and writes model.pt and the Hugging Face folder."""
    import torch

    from forgetless.backbones.hf import save_pretrained_state

    dest = Path(args.scratch) / "export"
    if args.mode == "after":
        ds.destroy_engine(engines.pop())
        state = ds.streamed_state_dict(model, rank)
    else:
        full = ds.full_state_dict(model, 3)
        ds.destroy_engine(engines.pop())
        del model
        gc.collect()
        model = build()  # unpartitioned: a plain module on every rank
        model.load_state_dict(full)
        del full
        state = ds.consolidated_state_dict(model, 0, rank)
    if rank == 0:
        dest.mkdir(parents=True, exist_ok=True)
        torch.save(state, dest / "model.pt")
        prefix = "backbone.model."
        save_pretrained_state(model.backbone, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                              dest / "hf")
    torch.distributed.barrier()
    result["export"] = sampler.stage()


# ---------------------------------------------------------------------------------------------------------------------
# the driver


def run_config(args: argparse.Namespace, folder: Path, mode: str, workers: int) -> dict:
    """The workers' run (construction, a step, a checkpoint, the export), then with --resume a second set of
    fresh processes that resume from that checkpoint and take a step, as Ray Train's restarted workers do."""
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix=f"forgetless-mem-{mode}{workers}-"))
    t0 = time.time()
    try:
        launch(args, folder, mode, workers, scratch, "run")
        ranks = [json.loads((scratch / f"rank{r}.json").read_text()) for r in range(workers)]
        if args.resume:
            launch(args, folder, mode, workers, scratch, "resume")
            for r, rank in enumerate(ranks):
                resumed = json.loads((scratch / f"rank{r}-resume.json").read_text())
                rank.update(resume=resumed["resume"], loss_after_resume=resumed["loss_after_resume"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return summarise(args, mode, workers, ranks, time.time() - t0)


def launch(args: argparse.Namespace, folder: Path, mode: str, workers: int, scratch: Path, part: str) -> None:
    """One process per rank (bounded by --timeout); raises with rank 0's log tail if any fails."""
    from forgetless.platform.driver.ports import free_port

    port = free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--worker", "--folder", str(folder), "--mode", mode, "--world", str(workers),
           "--port", str(port), "--scratch", str(scratch), "--optimizer", args.optimizer, "--precision",
           args.precision, "--threads", str(args.threads), "--part", part] + (["--gpu"] if args.gpu else [])
    procs = [subprocess.Popen(cmd + ["--rank", str(r)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(workers)]
    try:
        logs = [p.communicate(timeout=args.timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{mode} ({part}) with {workers} workers failed:\n" + logs[0][-3000:])


def summarise(args, mode: str, workers: int, ranks: list[dict], seconds: float) -> dict:
    params = ranks[0]["params"]
    bytes_per_param = {"adam": 20, "adamw": 20, "sgd": 12}[args.optimizer] // (2 if args.precision == "bf16" else 1)
    row = {"mode": mode, "workers": workers, "params": params, "size": args.size, "optimizer": args.optimizer,
           "precision": args.precision, "device": "gpu" if args.gpu else "cpu",
           "model_state_gb_per_worker": bytes_per_param * params / workers / 1e9,
           "base_gb": max(r["base_gb"] for r in ranks), "seconds": round(seconds, 1), "loss": ranks[0]["loss"]}
    for stage in STAGES:
        if stage in ranks[0]:
            row[f"{stage}_rss_gb"] = max(r[stage]["rss_gb"] for r in ranks)
            row[f"{stage}_rss_gb_rank0"] = ranks[0][stage]["rss_gb"]
            if args.gpu:
                row[f"{stage}_gpu_gb"] = max(r[stage]["gpu_gb"] for r in ranks)
    row["peak_rss_per_worker_gb"] = max(row[f"{s}_rss_gb"] for s in STAGES if f"{s}_rss_gb" in row)
    others = [row[f"{s}_rss_gb"] for s in STAGES if f"{s}_rss_gb" in row and s != "export"]
    row["peak_rss_per_worker_gb_without_export"] = max(others)
    if "loss_after_resume" in ranks[0]:
        row["loss_after_resume"] = ranks[0]["loss_after_resume"]
    return row


def table(rows: list[dict]) -> str:
    cols = ["mode", "workers", "params", "model_state_gb_per_worker", "base_gb"] + \
        [f"{s}_rss_gb" for s in STAGES] + ["peak_rss_per_worker_gb", "export_rss_gb_rank0", "seconds"]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(c.replace("_rss_gb", "").replace("_per_worker", "/worker") for c in cols) + " |",
             "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                       for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="0.3b")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--modes", nargs="+", choices=["before", "after"], default=["before", "after"])
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--resume", action="store_true", help="add the resume stage (fresh processes load the checkpoint and take a step)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", type=Path, default=OUT)
    for hidden in ("--worker",):
        ap.add_argument(hidden, action="store_true", help=argparse.SUPPRESS)
    for name, kind in (("--rank", int), ("--world", int), ("--port", int), ("--folder", str), ("--mode", str),
                       ("--scratch", str), ("--part", str)):
        ap.add_argument(name, type=kind, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    folder = model_folder(args.size)
    rows = []
    for mode in args.modes:
        for n in args.workers:
            say(f"{mode}: {n} worker(s), {args.size} decoder")
            try:
                rows.append(run_config(args, folder, mode, n))
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                say(f"{mode} with {n} workers did not finish: {str(e)[-1500:]}")
                continue
            say(json.dumps(rows[-1]))
    print(table(rows))
    old = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    keep = [r for r in old["rows"] if (r["mode"], r["workers"], r["size"], r["device"], r.get("optimizer")) not in
            {(r2["mode"], r2["workers"], r2["size"], r2["device"], r2.get("optimizer")) for r2 in rows}]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"what": "peak RSS per worker (GB = 1e9 bytes) per stage, ZeRO-3; see "
                                            "benchmarks/memory.py", "rows": keep + rows}, indent=1))


if __name__ == "__main__":
    main()
