#!/usr/bin/env bash
# The GPU figures of docs/large_models.md in one command, on one GPU machine, in under 8 minutes:
#
#     bash benchmarks/gpu_suite.sh            # from the repository root, forgetless's environment active
#
# 1. throughput and MFU of a ~1.1B Llama-style decoder (seq 2048, bf16, activation checkpointing) at ZeRO-2 and
#    ZeRO-3, one epoch of 512 samples per stage            (benchmarks/throughput.py --size full --gpu)
# 2. the memory table: ~1B decoder, 1 GPU, before/after partitioned construction, peak host RSS and peak GPU memory
#    per stage                                               (benchmarks/memory.py --gpu --size 1b)
# 3. the platform's overhead ratio against plain torch + DeepSpeed on the same GPU (benchmarks/overhead.py --gpu)
# then one table of all three. Each part has its own time limit (TIME_* below, seconds) so that one stuck part cannot
# take the whole budget; a part that fails or runs out of time is reported as such and the others still run.
# Results: benchmarks/results/gpu/*.json (and the table in benchmarks/results/gpu/suite.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
TIME_THROUGHPUT=${TIME_THROUGHPUT:-270}
TIME_MEMORY=${TIME_MEMORY:-110}
TIME_OVERHEAD=${TIME_OVERHEAD:-80}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-$PWD}
status() { if [ "$1" -eq 0 ]; then echo ok; elif [ "$1" -eq 124 ]; then echo "timed out"; else echo "failed ($1)"; fi; }
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi: is this a GPU machine?"

timeout "$TIME_THROUGHPUT" python benchmarks/throughput.py --gpu --size full --models decoder --zero 2 3 --epochs 1 \
    --workers 1 --samples 512 --out "$OUT/throughput.json" > "$OUT/throughput.log" 2>&1
S_THROUGHPUT=$(status $?)
timeout "$TIME_MEMORY" python benchmarks/memory.py --gpu --size 1b --workers 1 --modes before after --precision bf16 \
    --out "$OUT/memory.json" > "$OUT/memory.log" 2>&1
S_MEMORY=$(status $?)
timeout "$TIME_OVERHEAD" python benchmarks/overhead.py --gpu --size small --workers 1 --epochs 1 \
    --out "$OUT/overhead.json" > "$OUT/overhead.log" 2>&1
S_OVERHEAD=$(status $?)

python - "$OUT" "$S_THROUGHPUT" "$S_MEMORY" "$S_OVERHEAD" "$(( $(date +%s) - t0 ))" <<'EOF' | tee "$OUT/suite.md"
import json, sys
from pathlib import Path
out, s_tp, s_mem, s_ov, seconds = Path(sys.argv[1]), *sys.argv[2:]
def load(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None
print(f"GPU suite: {seconds} s; throughput {s_tp}, memory {s_mem}, overhead {s_ov} (logs in {out}/*.log)\n")
print("| part | setting | value |\n|---|---|---|")
tp = load("throughput")
for r in (tp or {}).get("rows", []):
    if r.get("size") == "full":
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "n/a"
        print(f"| throughput | decoder {r['params_non_embedding'] / 1e9:.2f}B, ZeRO-{r['zero']}, {r['precision']} | "
              f"{r['tokens_per_s_per_device']:.0f} tokens/s/GPU, {r['achieved_tflops_per_device']:.1f} TFLOP/s, "
              f"MFU {mfu} |")
mem = load("memory")
for r in (mem or {}).get("rows", []):
    if r.get("device") == "gpu":
        print(f"| memory | {r['mode']}, {r['workers']} GPU, {r['params'] / 1e9:.2f}B | peak host RSS "
              f"{r['peak_rss_per_worker_gb']:.2f} GB (construction {r['construction_rss_gb']:.2f}), peak GPU "
              f"{max(v for k, v in r.items() if k.endswith('_gpu_gb')):.2f} GB |")
ov = load("overhead")
if ov:
    print(f"| overhead | forgetless / plain torch+DeepSpeed, {ov['workers']} GPU, ZeRO-{ov['zero']} | training "
          f"{ov['training_phase_ratio']:.3f}, end to end {ov['end_to_end_ratio']:.2f} |")
EOF
