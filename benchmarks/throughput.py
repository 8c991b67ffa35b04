"""Throughput of fine-tuning large backbones through forgetless (Ray Train + DeepSpeed): samples/s, tokens/s and
model FLOPs utilisation (MFU) per device, for a decoder (Llama-style) and a ViT encoder at ZeRO stages 2 and 3.

    python benchmarks/throughput.py                     # tiny sizes, CPU: proves the harness (minutes)
    python benchmarks/throughput.py --size full --gpu   # ~1.1B Llama-style decoder and ViT-L/16, bf16, on GPUs

Formula (stated in the output as well):
    tokens/s per device   = optimizer micro-steps x micro-batch x tokens per sample / training seconds (rank 0)
    achieved FLOP/s       = 6 x N x tokens/s per device     (forward 2N + backward 4N per token; attention's
                                                              sequence-length term and activation recomputation are
                                                              not counted, as in the usual MFU definition)
    MFU                   = achieved FLOP/s / peak dense FLOP/s of the device at the training precision
N = backbone parameters without the input embedding table (a lookup, not a matmul). Tokens per sample: the sequence
length for the decoder, patches + 1 (CLS) for ViT. On CPU no peak is assumed: achieved TFLOP/s is reported, and MFU
only when --peak-tflops is given. Training seconds are the platform's own measure of the training loop (evaluation,
checkpoints and tracking excluded); every device trains the same number of micro-steps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Peak dense bf16 tensor FLOP/s (vendor datasheets, without sparsity).
GPU_PEAK_BF16 = {"H200": 989.4e12, "H100 SXM": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 PCIe": 756.0e12,
                 "H100 NVL": 835.0e12, "H100": 989.4e12, "A100": 312.0e12, "L40S": 362.05e12, "A10G": 70.0e12}

SIZES = {
    # ~1.1B parameters: TinyLlama's shape (22 layers, hidden 2048, GQA with 4 KV heads)
    "decoder": {"tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=1000, seq=64, batch=8, samples=256),
                "full": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                             num_key_value_heads=4, vocab_size=32000, seq=2048, batch=8, samples=2048)},
    # ViT-L/16 at 224x224 (~304M parameters)
    "vit": {"tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8, batch=32, samples=None),
            "full": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         image_size=224, patch_size=16, batch=32, samples=None)},
}


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# model folders and data made here (random weights: throughput does not depend on their values; no download)


def make_decoder_folder(dest: Path, spec: dict) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaModel

    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size")
    cfg = LlamaConfig(max_position_embeddings=max(spec["seq"], 128), pad_token_id=0,
                      **{k: spec[k] for k in keys})
    torch.manual_seed(0)
    LlamaModel(cfg).save_pretrained(dest)
    return dest


def make_vit_folder(dest: Path, spec: dict) -> Path:
    import torch
    from transformers import ViTConfig, ViTModel

    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
            "patch_size")
    torch.manual_seed(0)
    ViTModel(ViTConfig(num_channels=3, **{k: spec[k] for k in keys})).save_pretrained(dest)
    (dest / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True, "image_mean": [0.5] * 3,
                                                               "image_std": [0.5] * 3}))
    return dest


def make_token_task(dest: Path, n: int, seq: int, vocab: int, classes: int = 4) -> Path:
    """Random token ids (no padding) in the layout of forgetless.data.text: x (N, 2, L) = ids, mask."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab, size=(n, seq)).astype(np.float32)
    x = np.stack([ids, np.ones_like(ids)], axis=1)
    np.savez(dest, x=x, y=np.arange(n) % classes)
    return dest


def non_embedding_params(folder: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):  # shapes only: no memory, no init
        model = AutoModel.from_config(AutoConfig.from_pretrained(folder))
    emb = model.get_input_embeddings()
    n_emb = sum(p.numel() for p in emb.parameters()) if emb is not None and hasattr(emb, "weight") and \
        getattr(emb, "num_embeddings", None) else 0
    return sum(p.numel() for p in model.parameters()) - n_emb


# ---------------------------------------------------------------------------------------------------------------------
# one platform run


def platform_config(name: str, backbone: str, dataset: str, source_classes, target_classes, batch: int, epochs: int,
                    workers: int, zero: int, use_gpu: bool, precision: str, storage: str, strategy="finetune",
                    backbone_params: dict | None = None, source_samples_per_class: int | None = 8,
                    cpus_per_worker: float = 1.0, extra_ds: dict | None = None) -> dict:
    return {
        "name": name, "storage": storage,
        "source": {"dataset": dataset, "classes": list(source_classes), "samples_per_class": source_samples_per_class,
                   "name": "source"},
        "targets": [{"dataset": dataset, "classes": list(target_classes), "name": "target"}],
        "backbone": {"name": backbone, "params": backbone_params or {}},
        "pretrain": {"epochs": 1, "checkpoint_every": 1, "lr": 1e-3, "batch_size": batch},
        "train": {"epochs": epochs, "lr": 1e-4, "batch_size": batch},
        "strategies": [strategy],
        "scaling": {"num_workers": workers, "use_gpu": use_gpu, "cpus_per_worker": cpus_per_worker},
        "deepspeed": {"zero_stage": zero, "precision": precision, **(extra_ds or {})},
        "tracking": {"log_model": False, "experiment": "benchmarks"},
    }


def run_platform(cfg: dict):
    """(StrategyResult, seconds of the whole compare call) for a one-strategy config."""
    from forgetless.config import load_config
    from forgetless.platform.driver.runner import execute

    t0 = time.perf_counter()
    out = execute(load_config(cfg), "compare")
    return out.results[0], time.perf_counter() - t0


def pretrain_once(cfg: dict) -> str:
    """Run (or reuse) the config's pre-training and return its final stop point, to start several transfer runs
    (other worker counts, other ZeRO stages) from the same weights without pre-training each time."""
    from forgetless.config import load_config
    from forgetless.platform.driver import fits, preflight
    from forgetless.platform.tracking import mlflow_runs as tracking

    econf = load_config(cfg)
    uri = preflight.preflight(econf)
    exp = tracking.ensure_experiment(uri, econf.tracking.experiment)
    return fits.pretrain(econf, tracking.TrackingTarget(uri, exp, None)).final().uri


def transfer_only(cfg: dict, init_weights: str):
    """One strategy's Ray Train run from the given stop point: (StrategyResult, seconds)."""
    from forgetless.config import load_config
    from forgetless.platform.driver import fits, preflight, ray_cluster
    from forgetless.platform.tracking import mlflow_runs as tracking

    econf = load_config(cfg)
    uri = preflight.preflight(econf)
    ray_cluster.check_resources(econf)
    exp = tracking.ensure_experiment(uri, econf.tracking.experiment)
    t0 = time.perf_counter()
    res = fits.transfer(econf, econf.strategies[0], init_weights, tracking.TrackingTarget(uri, exp, None))
    return res, time.perf_counter() - t0


def machine_load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def device_name(use_gpu: bool) -> str:
    if use_gpu:
        import torch

        return torch.cuda.get_device_name(0)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"


def peak_for(name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for key, peak in GPU_PEAK_BF16.items():  # longest names first would be safer; the table is ordered that way
        if key in name:
            return peak
    return None


def print_table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    head = [c[1] for c in cols]
    cells = [[("-" if r.get(k) is None else (f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k])))
              for k, _ in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def ensure_ray(num_cpus: int | None, use_gpu: bool) -> None:
    """A local Ray cluster started exactly as the platform starts one (forgetless.platform.driver.runner.init_ray)."""
    import ray

    from forgetless.platform.driver.ray_cluster import init_ray

    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not ray.is_initialized():
        init_ray(None, use_gpu, num_cpus)


# ---------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--gpu", action="store_true", help="train on GPUs (bf16 by default)")
    ap.add_argument("--workers", type=int, default=None, help="devices / processes (default: 2 on CPU, all GPUs)")
    ap.add_argument("--zero", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--models", nargs="+", default=["decoder", "vit"], choices=["decoder", "vit"])
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--samples", type=int, default=None, help="decoder token samples (default: the size's)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="(default on for --size full)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s of one device (for MFU on CPU)")
    ap.add_argument("--out", default="benchmarks/results/throughput.json")
    ap.add_argument("--workdir", default=None, help="folder for models, data, runs (default: a temp folder)")
    a = ap.parse_args(argv)

    import torch

    workers = a.workers or (torch.cuda.device_count() if a.gpu else 2)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="forgetless-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # the runs' MLflow store and storage live here
    ensure_ray(None if a.gpu else max(workers, 2), a.gpu)
    dev = device_name(a.gpu)
    peak = peak_for(dev, a.peak_tflops) if (a.gpu or a.peak_tflops) else None
    gc = a.gradient_checkpointing or a.size == "full"
    rows = []
    for kind in a.models:
        spec = SIZES[kind][a.size]
        folder = work / f"{kind}-{a.size}"
        if not (folder / "config.json").exists():
            say(f"writing a random-init {kind} ({a.size}) model folder to {folder}")
            (make_decoder_folder if kind == "decoder" else make_vit_folder)(folder, spec)
        n_params = non_embedding_params(folder)
        if kind == "decoder":
            data = work / f"tokens-{a.size}.npz"
            if not data.exists():
                make_token_task(data, a.samples or spec["samples"], spec["seq"], spec["vocab_size"])
            dataset, src, tgt, tokens_per_sample = str(data), [0, 1], [2, 3], spec["seq"]
        else:
            # real images (scikit-learn's digits), resized by the model's own preprocessing to its input size
            dataset, src, tgt = "digits", [0, 1], [2, 3, 4, 5, 6, 7, 8, 9]
            tokens_per_sample = (spec["image_size"] // spec["patch_size"]) ** 2 + 1
        init = None
        for zero in a.zero:
            cfg = platform_config(f"thr-{kind}-{a.size}-z{zero}", f"hf:{folder}", dataset, src, tgt, spec["batch"],
                                  a.epochs, workers, zero, a.gpu, a.precision, str(work / "runs"),
                                  backbone_params={"gradient_checkpointing": gc},
                                  cpus_per_worker=1.0 if not a.gpu else 4.0)
            say(f"{kind} ZeRO-{zero}: {workers} workers, micro-batch {spec['batch']}, {a.epochs} epochs")
            init = init or pretrain_once(cfg)  # the source head, once per model (the ZeRO stage does not change it)
            res, _ = transfer_only(cfg, init)
            steps = res.global_step
            samples_dev = steps * spec["batch"] / res.train_seconds
            tokens_dev = samples_dev * tokens_per_sample
            flops_dev = 6.0 * n_params * tokens_dev
            rows.append({
                "model": kind, "size": a.size, "params_non_embedding": n_params, "zero": zero,
                "precision": ("bf16" if a.gpu else "fp32") if a.precision == "auto" else a.precision,
                "devices": workers, "device": dev, "micro_batch": spec["batch"], "tokens_per_sample": tokens_per_sample,
                "steps": steps, "train_seconds": res.train_seconds, "samples_per_s_per_device": samples_dev,
                "tokens_per_s_per_device": tokens_dev, "achieved_tflops_per_device": flops_dev / 1e12,
                "peak_tflops_per_device": peak / 1e12 if peak else None,
                "mfu": flops_dev / peak if peak else None, "gradient_checkpointing": gc,
                "load_average": machine_load(),
            })
    print(f"\nthroughput on {dev}; MFU = 6*N*tokens/s per device / peak (N = non-embedding params)")
    table = print_table(rows, [("model", "model"), ("params_non_embedding", "N"), ("zero", "ZeRO"),
                               ("precision", "precision"), ("devices", "devices"),
                               ("samples_per_s_per_device", "samples/s/dev"), ("tokens_per_s_per_device",
                                                                               "tokens/s/dev"),
                               ("achieved_tflops_per_device", "TFLOP/s/dev"), ("mfu", "MFU")])
    out = Path(a.out) if Path(a.out).is_absolute() else Path(__file__).resolve().parent.parent / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "throughput", "device": dev, "formula": "MFU = 6*N*tokens_per_s_per_device"
                               " / peak_flops_per_device; N = non-embedding parameters", "rows": rows,
                               "table": table}, indent=1))
    say(f"wrote {out}")


if __name__ == "__main__":
    main()
