"""A Tune trial's fixed cost next to a `compare` run's (issue 31, item 4), measured side by side and interleaved.

The demo's finetune run (examples/digits_transfer.yaml) on the embedded cluster, in one driver process: after a
warm-up of each (the pre-training runs once and is reused by everything after it), every round runs
  1. `forgetless.compare` of finetune (a new label, so nothing is reused), and
  2. `forgetless.tune` of a one-trial grid search that fine-tunes the same strategy from the last stop point with the
     same learning rate (a new search seed, so a new search),
and records:
  - compare: the call's wall time and its run's fixed cost (everything but the training loop, platform/worker/timing);
  - tune: the call's wall time, Tuner.fit's wall time, the trial's Ray Train run's fixed cost (the same parts as the
    compare run's), and Tune's own share (Tuner.fit minus the trial's Ray Train run).
Min and median over the rounds. Run it alone on the machine: other jobs make every part slower.

    python benchmarks/trial_cost.py --workdir /tmp/fl_trial_cost              # 3 rounds
    python benchmarks/trial_cost.py --workdir /tmp/fl_trial_cost --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "digits_transfer.yaml"
RESULT = ROOT / "benchmarks" / "results" / "trial_cost.json"


def compare_round(i: int) -> dict[str, float]:
    import forgetless
    from forgetless.config import StrategyConfig
    from forgetless.platform.worker import timing

    cfg = forgetless.load_config(str(CONFIG))
    cfg = cfg.model_copy(update={"strategies": [StrategyConfig(name="finetune", label=f"finetune-r{i}")]})
    t0 = time.perf_counter()
    res = forgetless.compare(cfg).results[0]
    return {"call": time.perf_counter() - t0, "run fixed cost": timing.fixed_cost(res.seconds),
            "training": res.seconds.get("training", 0.0)}


def tune_round(i: int) -> dict[str, float]:
    import forgetless
    from forgetless.platform.tracking import mlflow_runs as tracking

    cfg = forgetless.load_config(str(CONFIG), ["strategies=[finetune]"])
    last = cfg.pretrain.epochs
    search = {"space": {"stop_point": [last], "train.lr": [cfg.train.lr]}, "searcher": "grid", "seed": 1000 + i}
    t0 = time.perf_counter()
    res = forgetless.tune(cfg, search=search)
    call = time.perf_counter() - t0
    m = tracking.client(res.tracking_uri).get_run(res.trials[0].mlflow_run_id).data.metrics
    run = m["search/seconds/fixed"] + m["search/seconds/training"]
    return {"call": call, "Tuner.fit": res.tune_seconds, "run fixed cost": m["search/seconds/fixed"],
            "training": m["search/seconds/training"], "Tune's share": res.tune_seconds - run}


def stats(rounds: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k: {"min": min(r[k] for r in rounds), "median": statistics.median(r[k] for r in rounds)}
            for k in rounds[0]}


def table(out: dict) -> str:
    lines = ["| | part | min s | median s |", "|---|---|---|---|"]
    for kind in ("compare", "tune"):
        for part, v in out[kind]["stats"].items():
            lines.append(f"| {kind} | {part} | {v['min']:.1f} | {v['median']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/fl_trial_cost")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)
    compare_round(-1)  # warm-up: the pre-training, imports, the embedded cluster
    tune_round(-1)
    rounds: dict[str, list] = {"compare": [], "tune": []}
    for i in range(args.rounds):  # interleaved: a slower machine slows both alike
        rounds["compare"].append(compare_round(i))
        rounds["tune"].append(tune_round(i))
    out = {k: {"rounds": v, "stats": stats(v)} for k, v in rounds.items()}
    out["config"], out["cpus"] = str(CONFIG.relative_to(ROOT)), os.cpu_count()
    RESULT.write_text(json.dumps(out, indent=1))
    print(table(out))
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
