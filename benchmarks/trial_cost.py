"""A Tune trial's fixed cost next to a `compare` run's (issue 31, item 4), measured side by side and interleaved.

The demo's finetune run (examples/digits_transfer.yaml) on the embedded cluster, in one driver process: after a
warm-up of each (the pre-training runs once and is reused by everything after it), every round runs
  1. `forgetless.compare` of finetune (a new label, so nothing is reused), and
  2. `forgetless.tune` of a one-trial grid search that fine-tunes the same strategy from the last stop point with the
     same learning rate (a new search seed, so a new search),
and records:
  - compare: the call's wall time, its run's fixed cost (everything but the training loop: the run's parts,
    platform/worker/timing, from the driver's submit to its MLflow artifacts) and the training loop's seconds;
  - tune: the call's wall time, Tuner.fit's wall time, the trial's fixed cost (Tuner.fit minus the trial's training
    loop: everything the one-trial search spends that is not training, Tune's set-up and tear-down included), the
    trial's Ray Train run's own fixed cost (the same parts as the compare run's, to the run's end) and Tune's share
    (Tuner.fit minus the trial's Ray Train run: the trial's process, its MLflow logging, Tune's own work);
  - the 1-minute load average before the round (other work on the machine makes every part slower).
Min and median over the rounds. The target: the trial's fixed cost is at most the compare run's. Run it alone, under
the repository's heavy-work lock.

    python benchmarks/trial_cost.py --workdir /tmp/fl_trial_cost              # 3 rounds, writes the JSON and docs
    python benchmarks/trial_cost.py --workdir /tmp/fl_trial_cost --rounds 5
    python benchmarks/trial_cost.py --docs                                    # rewrites docs/tune.md's table only
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "digits_transfer.yaml"
RESULT = ROOT / "benchmarks" / "results" / "trial_cost.json"
BEFORE = ROOT / "benchmarks" / "results" / "trial_cost_before.json"  # the same benchmark before the change (its note)
DOC = ROOT / "docs" / "tune.md"
START, END = "<!-- trial-cost:start (benchmarks/trial_cost.py --docs) -->", "<!-- trial-cost:end -->"


def compare_round(i: int) -> dict[str, float]:
    import forgetless
    from forgetless.config import StrategyConfig
    from forgetless.platform.worker import timing

    cfg = forgetless.load_config(str(CONFIG))
    cfg = cfg.model_copy(update={"strategies": [StrategyConfig(name="finetune", label=f"finetune-r{i}")]})
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = forgetless.compare(cfg).results[0]
    call = time.perf_counter() - t0
    return {"call": call, "run fixed cost": timing.fixed_cost(res.seconds), "training": res.seconds["training"],
            "load before": load}


def tune_round(i: int) -> dict[str, float]:
    import forgetless
    from forgetless.platform.tracking import mlflow_runs as tracking

    cfg = forgetless.load_config(str(CONFIG), ["strategies=[finetune]"])
    last = cfg.pretrain.epochs
    search = {"space": {"stop_point": [last], "train.lr": [cfg.train.lr]}, "searcher": "grid", "seed": 1000 + i}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = forgetless.tune(cfg, search=search)
    call = time.perf_counter() - t0
    m = tracking.client(res.tracking_uri).get_run(res.trials[0].mlflow_run_id).data.metrics
    training = m["search/seconds/training"]
    run = m["search/seconds/fixed"] + training
    return {"call": call, "Tuner.fit": res.tune_seconds, "trial fixed cost": res.tune_seconds - training,
            "run fixed cost": m["search/seconds/fixed"], "training": training, "Tune's share": res.tune_seconds - run,
            "load before": load}


def stats(rounds: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k: {"min": min(r[k] for r in rounds), "median": statistics.median(r[k] for r in rounds)}
            for k in rounds[0]}


def table(out: dict) -> str:
    lines = ["| | part | min s | median s |", "|---|---|---|---|"]
    for kind in ("compare", "tune"):
        for part, v in out[kind]["stats"].items():
            if part != "load before":
                lines.append(f"| {kind} | {part} | {v['min']:.1f} | {v['median']:.1f} |")
    return "\n".join(lines)


def verdict(out: dict) -> str:
    c, t = out["compare"]["stats"]["run fixed cost"], out["tune"]["stats"]["trial fixed cost"]
    met = t["min"] <= c["min"] and t["median"] <= c["median"]
    loads = [r["load before"] for k in ("compare", "tune") for r in out[k]["rounds"] if "load before" in r]
    load = f", 1-minute load {min(loads):.1f}-{max(loads):.1f} before the rounds" if loads else ""
    return (f"Trial fixed cost {t['min']:.1f} s min / {t['median']:.1f} s median against the compare run's "
            f"{c['min']:.1f} / {c['median']:.1f} s: {'met' if met else 'not met'} "
            f"(ratio of medians {t['median'] / c['median']:.2f}; {len(out['compare']['rounds'])} interleaved rounds, "
            f"{out['cpus']} CPUs{load}; commit {out.get('commit', '?')}).")


def render(out: dict, before: dict | None = None) -> str:
    lines = [START, "", table(out), "", verdict(out)]
    if before is not None:
        lines += ["", f"Before the change ({before['note']}):", "", table(before), "", verdict(before)]
    return "\n".join(lines + ["", END])


def _before() -> dict | None:
    return json.loads(BEFORE.read_text()) if BEFORE.exists() else None


def write_docs(out: dict) -> None:
    text = DOC.read_text()
    block = render(out, _before())
    if START in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/fl_trial_cost")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--docs", action="store_true", help="only rewrite docs/tune.md's table from the JSON")
    ap.add_argument("--commit", help="the commit measured (default: this checkout's HEAD)")
    args = ap.parse_args()
    if not args.docs:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        os.chdir(args.workdir)
        compare_round(-1)  # warm-up: the pre-training, imports, the embedded cluster
        tune_round(-1)
        rounds: dict[str, list] = {"compare": [], "tune": []}
        for i in range(args.rounds):  # interleaved: a slower machine slows both alike
            rounds["compare"].append(compare_round(i))
            rounds["tune"].append(tune_round(i))
        out = {k: {"rounds": v, "stats": stats(v)} for k, v in rounds.items()}
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        out.update({"config": str(CONFIG.relative_to(ROOT)), "cpus": os.cpu_count(),
                    "commit": args.commit or commit or "?"})
        RESULT.write_text(json.dumps(out, indent=1))
        print(f"wrote {RESULT}")
    out = json.loads(RESULT.read_text())
    write_docs(out)
    print(render(out, _before()))


if __name__ == "__main__":
    main()
