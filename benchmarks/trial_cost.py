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

from forgetless.platform.analysis import paired

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "digits_transfer.yaml"
RESULT = ROOT / "benchmarks" / "results" / "trial_cost.json"
# the same benchmark before earlier changes, newest first (each with its note): trial_cost_before*.json
BEFORE_GLOB = "trial_cost_before*.json"
DOC = ROOT / "docs" / "tune.md"
START, END = "<!-- trial-cost:start (benchmarks/trial_cost.py --docs) -->", "<!-- trial-cost:end -->"


# A new label and search seed in every invocation, so that a workdir measured before reuses only the pre-training.
NONCE = int(time.time()) % 10**6


def compare_round(i: int, k: int = 1) -> dict[str, float]:
    """A compare of `k` finetune runs (new labels); per run: the mean of the runs' parts."""
    import forgetless
    from forgetless.config import StrategyConfig
    from forgetless.platform.worker import timing

    cfg = forgetless.load_config(str(CONFIG))
    cfg = cfg.model_copy(update={"strategies": [StrategyConfig(name="finetune", label=f"finetune-{NONCE}-r{i}-{j}")
                                                for j in range(k)]})
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    results = forgetless.compare(cfg).results
    call = time.perf_counter() - t0
    return {"call": call, "run fixed cost": statistics.mean(timing.fixed_cost(r.seconds) for r in results),
            "training": statistics.mean(r.seconds["training"] for r in results), "load before": load}


def tune_round(i: int, k: int = 1) -> dict[str, float]:
    """A grid search of `k` trials (the same fine-tune at k learning rates a hair apart: k runs); per trial: Tuner.fit's
    share (Tuner.fit / k) and the means of the trials' runs' parts."""
    import forgetless
    from forgetless.platform.tracking import mlflow_runs as tracking

    cfg = forgetless.load_config(str(CONFIG), ["strategies=[finetune]"])
    last = cfg.pretrain.epochs
    rates = [cfg.train.lr * (1 + j / 1000) for j in range(k)]
    search = {"space": {"stop_point": [last], "train.lr": rates}, "searcher": "grid",
              "seed": NONCE * 10 + i + 1}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = forgetless.tune(cfg, search=search)
    call = time.perf_counter() - t0
    metrics = [tracking.client(res.tracking_uri).get_run(t.mlflow_run_id).data.metrics for t in res.trials]
    training = statistics.mean(m["search/seconds/training"] for m in metrics)
    fixed = statistics.mean(m["search/seconds/fixed"] for m in metrics)
    per_trial = res.tune_seconds / len(metrics)
    return {"call": call, "Tuner.fit": per_trial, "trial fixed cost": per_trial - training,
            "run fixed cost": fixed, "training": training, "Tune's share": per_trial - fixed - training,
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


def paired_difference(out: dict) -> tuple[float, float, float, float] | None:
    """Round by round, the trial's fixed cost minus the compare run's (the two ran one after the other): mean,
    bootstrap 95% interval and paired t-test p-value (analysis/paired.py); None below 2 rounds."""
    compare = [r["run fixed cost"] for r in out["compare"]["rounds"]]
    tune = [r["trial fixed cost"] for r in out["tune"]["rounds"]]
    if min(len(compare), len(tune)) < 2:
        return None
    differences = [t - c for c, t in zip(compare, tune)]
    low, high = paired.bootstrap_interval(differences)
    return statistics.mean(differences), low, high, paired.paired_t_pvalue(tune[:len(compare)], compare[:len(tune)])


def verdict(out: dict) -> str:
    """Met: the trial's fixed cost is at most the compare run's, in min and median. Otherwise the paired difference
    decides between "not met" (its 95% interval lies above 0) and "at parity within the noise" (the interval holds
    0: the rounds show no difference)."""
    c, t = out["compare"]["stats"]["run fixed cost"], out["tune"]["stats"]["trial fixed cost"]
    met = t["min"] <= c["min"] and t["median"] <= c["median"]
    loads = [r["load before"] for k in ("compare", "tune") for r in out[k]["rounds"] if "load before" in r]
    load = f", 1-minute load {min(loads):.1f}-{max(loads):.1f} before the rounds" if loads else ""
    d = paired_difference(out)
    word = "met" if met else "not met"
    detail = ""
    if d is not None:
        mean, low, high, p = d
        if not met and low <= 0:
            word = "at parity within the noise (not met by min and median)"
        detail = (f"; per round, trial minus compare {mean:+.2f} s, 95% interval [{low:+.2f}, {high:+.2f}] s, "
                  f"paired t-test p = {p:.2f}")
    return (f"Trial fixed cost {t['min']:.1f} s min / {t['median']:.1f} s median against the compare run's "
            f"{c['min']:.1f} / {c['median']:.1f} s: {word} "
            f"(ratio of medians {t['median'] / c['median']:.2f}{detail}; {len(out['compare']['rounds'])} interleaved "
            f"rounds, {out['cpus']} CPUs{load}; commit {out.get('commit', '?')}).")


def render(out: dict, before: list[dict] = (), several: list[dict] = ()) -> str:
    lines = [START, "", table(out), "", verdict(out)]
    for k_out in several:
        n = k_out["trials"]
        lines += ["", f"Commit {k_out.get('commit', '?')}: a compare of {n} runs next to a search of {n} trials "
                      f"(`call`: the whole call; the other rows "
                      f"per run and per trial, Tuner.fit / {n}; Tune's trial process serves the search's trials one "
                      f"after another):", "", table(k_out), "", verdict(k_out)]
    for b in before:
        lines += ["", f"Before ({b['note']}):", "", table(b), "", verdict(b)]
    return "\n".join(lines + ["", END])


def _before() -> list[dict]:
    """The earlier measurements: the later ones by name, then the first (trial_cost_before.json)."""
    paths = sorted(RESULT.parent.glob(BEFORE_GLOB), key=lambda p: (p.name == "trial_cost_before.json", p.name))
    return [json.loads(p.read_text()) for p in paths]


def _several() -> list[dict]:
    """The results of the runs with --trials N > 1."""
    return [json.loads(p.read_text()) for p in sorted(RESULT.parent.glob("trial_cost_k*.json"))]


def write_docs(out: dict) -> None:
    text = DOC.read_text()
    block = render(out, _before(), _several())
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
    ap.add_argument("--trials", type=int, default=1,
                    help="runs a compare and trials a search has (default 1; more: per run and per trial, "
                         "written to trial_cost_k<N>.json)")
    args = ap.parse_args()
    result = RESULT if args.trials == 1 else RESULT.with_name(f"trial_cost_k{args.trials}.json")
    if not args.docs:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        os.chdir(args.workdir)
        compare_round(-1)  # warm-up: the pre-training, imports, the embedded cluster
        tune_round(-1)
        rounds: dict[str, list] = {"compare": [], "tune": []}
        for i in range(args.rounds):  # interleaved: a slower machine slows both alike
            rounds["compare"].append(compare_round(i, args.trials))
            rounds["tune"].append(tune_round(i, args.trials))
        out = {k: {"rounds": v, "stats": stats(v)} for k, v in rounds.items()}
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        out.update({"config": str(CONFIG.relative_to(ROOT)), "cpus": os.cpu_count(),
                    "commit": args.commit or commit or "?", "trials": args.trials})
        result.write_text(json.dumps(out, indent=1))
        print(f"wrote {result}")
    out = json.loads(RESULT.read_text())
    write_docs(out)
    print(render(out, _before(), _several()))


if __name__ == "__main__":
    main()
