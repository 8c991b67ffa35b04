"""Scaling: time per optimizer step through forgetless as data-parallel workers go 1 -> 2 -> 4 (weak scaling: the
per-worker micro-batch stays fixed, so the ideal time per step is constant and the global batch grows).

    python benchmarks/scaling.py                          # CPU processes, a small BERT-style encoder
    python benchmarks/scaling.py --gpu --workers 1 2 4 8  # GPUs

efficiency(N) = time per step with 1 worker / time per step with N workers  (1.0 = perfect weak scaling)
throughput(N) = N x micro-batch / time per step
Time per step = the platform's training seconds (rank 0, training loop only) / micro-steps on rank 0.
On CPU, N workers need N free cores: with fewer cores than workers the processes share cores and the efficiency
measures oversubscription, not the platform; the table records the core count next to the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> None:
    from overhead import SIZES, make_encoder_folder
    from throughput import (device_name, ensure_ray, machine_load, make_token_task, platform_config, pretrain_once,
                            print_table, say, transfer_only)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="tiny")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/scaling.json")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args(argv)

    spec = SIZES[a.size]
    repo = Path(__file__).resolve().parent.parent
    work = Path(a.workdir or tempfile.mkdtemp(prefix="forgetless-scaling-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    folder = work / f"encoder-{a.size}"
    if not (folder / "config.json").exists():
        make_encoder_folder(folder, spec)
    data = work / f"tokens-{a.size}.npz"
    if not data.exists():
        # enough samples that the largest worker count still runs several steps per epoch
        make_token_task(data, max(spec["samples"], 8 * spec["batch"] * max(a.workers) * 2), spec["seq"],
                        spec["vocab_size"])
    # Ray is told it has as many CPUs as the largest run needs (logical CPUs; see the docstring on oversubscription).
    ensure_ray(None if a.gpu else max(a.workers), a.gpu)
    rows = []
    init = None
    for n in a.workers:
        cfg = platform_config(f"scaling-{a.size}-w{n}", f"hf:{folder}", str(data), [0, 1], [2, 3], spec["batch"],
                              a.epochs, n, a.zero, a.gpu, "auto", str(work / "runs"))
        say(f"{n} worker(s), ZeRO-{a.zero}, micro-batch {spec['batch']}")
        init = init or pretrain_once(cfg)  # every worker count starts from the same stop point
        res, _ = transfer_only(cfg, init)
        t_step = res.train_seconds / res.global_step
        rows.append({"workers": n, "steps": res.global_step, "train_seconds": res.train_seconds,
                     "step_ms": 1000 * t_step, "samples_per_s": n * spec["batch"] / t_step, "load_average": machine_load()})
    base = rows[0]["step_ms"]  # time per step with one worker
    for r in rows:
        r["efficiency"] = base / r["step_ms"] if rows[0]["workers"] == 1 else None
        r["speedup_samples_per_s"] = r["samples_per_s"] / rows[0]["samples_per_s"]
    dev = device_name(a.gpu)
    print(f"\nweak scaling on {dev}: {a.size} BERT-style encoder, micro-batch {spec['batch']} per worker, "
          f"seq {spec['seq']}, ZeRO-{a.zero}")
    table = print_table(rows, [("workers", "workers"), ("steps", "steps/worker"), ("step_ms", "ms/step"),
                               ("samples_per_s", "samples/s (all)"), ("speedup_samples_per_s", "speed-up"),
                               ("efficiency", "efficiency")])
    out = Path(a.out) if Path(a.out).is_absolute() else repo / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "scaling", "device": dev, "cores": os.cpu_count(), "size": a.size,
                               "zero": a.zero, "micro_batch": spec["batch"], "rows": rows, "table": table,
                               "efficiency": "t_step(1) / t_step(N), weak scaling"}, indent=1))
    say(f"wrote {out}")


if __name__ == "__main__":
    main()
