"""Does a two-objective search find the hand grid's learning-vs-forgetting front with fewer trials? (issue 31, item 5a)

The stop point x learning rate study of examples/early_stop_search.yaml, searched for the Pareto set of target
accuracy (max) vs source forgetting (min):
  - the hand grid: every stop point (0, 10, 20, 30) x 4 learning rates, 16 trials;
  - Optuna's multi-objective TPE over the same stop points and a log range spanning the grid's rates, 6 trials
    (37.5 % of the grid), with 3 search seeds.
Each front is compared by its hypervolume (analysis.pareto.hypervolume_2d) against ONE reference point shared by
every front: the worst target accuracy and the worst forgetting over every trial of the study. Fronts are chosen on
validation data; the hypervolume of the chosen points is given on validation (what the searcher saw) and on test
(what is reported).

    python benchmarks/pareto_study.py --workdir /tmp/fl_pareto      # runs (or resumes) the searches, writes the JSON
    python benchmarks/pareto_study.py --docs                         # rewrites its section of docs/tune.md from it
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "early_stop_search.yaml"
RESULT = ROOT / "benchmarks" / "results" / "pareto_study.json"
DOC = ROOT / "docs" / "tune.md"
START, END = "<!-- pareto-study:start (benchmarks/pareto_study.py --docs) -->", "<!-- pareto-study:end -->"
TRADE_OFF = [("target/acc", "max"), ("source/forgetting", "min")]
OBJECTIVES = [{"metric": m, "direction": d} for m, d in TRADE_OFF]
GRID_LRS = [0.0003, 0.001, 0.003, 0.01]
SEARCH_TRIALS = 6
SEEDS = [0, 1, 2]
OVERRIDES = ["scaling.num_workers=1"]  # two one-worker trials at a time on a 2-core machine


def grid_search() -> dict:
    return {"space": {"stop_point": "all", "train.lr": GRID_LRS}, "searcher": "grid", "objectives": OBJECTIVES}


def optuna_search(seed: int) -> dict:
    return {"space": {"stop_point": "all", "train.lr": {"low": GRID_LRS[0], "high": GRID_LRS[-1], "log": True}},
            "searcher": "optuna", "sampler": "tpe", "num_samples": SEARCH_TRIALS, "seed": seed,
            "objectives": OBJECTIVES}


def _points(res, split: str) -> list[dict]:
    return [{"trial_id": t.trial_id, **t.params, **{m: t.metrics.get(f"{split}/{m}") for m, _ in TRADE_OFF}}
            for t in res.trials if t.status == "finished"]


def summarise(res, wall: float) -> dict:
    front = res.pareto()
    return {"name": res.name, "parent_run_id": res.parent_run_id, "trials": len(res.trials), "wall_seconds": wall,
            "val": _points(res, "val"), "test": _points(res, "test"), "front": front.trial_ids}


def run_all(workdir: Path) -> dict:
    import forgetless

    os.chdir(workdir)  # its own MLflow store and storage; every search reuses the one pre-training
    out: dict = {"config": str(CONFIG.relative_to(ROOT)), "overrides": OVERRIDES, "machine": platform.node(),
                 "cpus": os.cpu_count(), "grid": None, "searches": []}
    t0 = time.perf_counter()
    res = forgetless.tune(str(CONFIG), search=grid_search(), resume=True, overrides=OVERRIDES)
    out["grid"] = summarise(res, time.perf_counter() - t0)
    for seed in SEEDS:
        t0 = time.perf_counter()
        res = forgetless.tune(str(CONFIG), search=optuna_search(seed), resume=True, overrides=OVERRIDES)
        out["searches"].append({"seed": seed, **summarise(res, time.perf_counter() - t0)})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the analysis (pure: from the JSON)


def _finite(p: dict) -> bool:
    return all(isinstance(p.get(m), (int, float)) and math.isfinite(p[m]) for m, _ in TRADE_OFF)


def reference(study: dict) -> dict[str, float]:
    """One reference point for every front: the worst value of each objective over every trial, both splits (a
    trial without a value, e.g. no validation forgetting, counts on neither axis)."""
    runs = [study["grid"], *study["searches"]]
    pts = [p for r in runs for split in ("val", "test") for p in r[split] if _finite(p)]
    return {"target/acc": min(p["target/acc"] for p in pts), "source/forgetting": max(p["source/forgetting"] for p in pts)}


def analyse(study: dict) -> dict:
    from forgetless.platform.analysis.pareto import dominates, hypervolume_2d, pareto_front

    ref = reference(study)

    def hv(run: dict, split: str) -> float:
        chosen = [i for i in pareto_front(run["val"], TRADE_OFF)]  # chosen on validation ...
        return hypervolume_2d([run[split][i] for i in chosen], TRADE_OFF, ref)  # ... measured on either split

    def oriented(p: dict) -> tuple[float, float]:
        return (p["target/acc"], -p["source/forgetting"])

    grid = study["grid"]
    rows = []
    for s in study["searches"]:
        front = [s["val"][i] for i in pareto_front(s["val"], TRADE_OFF)]
        beyond = sum(not any(dominates(oriented(g), oriented(p)) for g in grid["val"] if _finite(g)) for p in front)
        rows.append({"seed": s["seed"], "trials": s["trials"], "front_points": len(front), "not_dominated_by_grid":
                     beyond, "hv_val": hv(s, "val"), "hv_test": hv(s, "test"), "wall_seconds": s["wall_seconds"]})
    return {"reference": ref, "grid": {"trials": grid["trials"], "front_points": len(grid["front"]),
                                       "hv_val": hv(grid, "val"), "hv_test": hv(grid, "test"),
                                       "wall_seconds": grid["wall_seconds"]}, "searches": rows}


def render(study: dict) -> str:
    a = analyse(study)
    g, ref = a["grid"], a["reference"]
    lines = [START, "",
             f"Reference point (shared): target accuracy {100 * ref['target/acc']:.1f} %, source forgetting "
             f"{100 * ref['source/forgetting']:.1f} points (the worst of every trial). Hypervolume in "
             f"(percentage points)², of the front chosen on validation, measured on validation and on test.", "",
             "| search | trials | front points | not dominated by the grid (val) | hypervolume val | hypervolume test "
             "| wall s |", "|---|---|---|---|---|---|---|",
             f"| hand grid (4 stop points x {len(GRID_LRS)} rates) | {g['trials']} | {g['front_points']} | - | "
             f"{1e4 * g['hv_val']:.1f} | {1e4 * g['hv_test']:.1f} | {g['wall_seconds']:.0f} |"]
    for r in a["searches"]:
        lines.append(f"| multi-objective TPE, seed {r['seed']} | {r['trials']} | {r['front_points']} | "
                     f"{r['not_dominated_by_grid']} | {1e4 * r['hv_val']:.1f} | {1e4 * r['hv_test']:.1f} | "
                     f"{r['wall_seconds']:.0f} |")
    ratio_val = [r["hv_val"] / g["hv_val"] for r in a["searches"] if g["hv_val"] > 0]
    ratio_test = [r["hv_test"] / g["hv_test"] for r in a["searches"] if g["hv_test"] > 0]
    if ratio_val and ratio_test:
        lines += ["", f"Search / grid hypervolume, mean over {len(ratio_val)} seeds (min-max): validation "
                      f"{statistics.mean(ratio_val):.2f} ({min(ratio_val):.2f}-{max(ratio_val):.2f}), test "
                      f"{statistics.mean(ratio_test):.2f} ({min(ratio_test):.2f}-{max(ratio_test):.2f}), with "
                      f"{a['searches'][0]['trials']} trials against {g['trials']} "
                      f"({100 * a['searches'][0]['trials'] / g['trials']:.0f} %)."]
    lines += ["", verdict(a, ratio_val, ratio_test)]
    missing = [p for r in [study["grid"], *study["searches"]] for p in r["val"] if not _finite(p)]
    if missing:
        sps = sorted({p.get("stop_point") for p in missing}, key=str)
        lines += ["", f"{len(missing)} trials (stop point {', '.join(map(str, sps))}) have no validation forgetting in "
                      f"this run (their stop point had no recorded source accuracy; trials now fall back to their "
                      f"own first evaluation): they are on no validation front, in the grid and the searches alike."]
    return "\n".join(lines + ["", END])


def verdict(a: dict, ratio_val: list[float], ratio_test: list[float]) -> str:
    """One sentence from the numbers: does the search reach the grid's front with its fewer trials?"""
    if not ratio_val:
        return "Verdict: no front to compare."
    beyond = [r["not_dominated_by_grid"] for r in a["searches"]]
    reach_val = sum(r >= 1.0 for r in ratio_val)
    reach_test = sum(r >= 1.0 for r in ratio_test)
    return (f"Verdict: on validation (what the searches chose on) {reach_val} of {len(ratio_val)} searches reach the "
            f"grid's hypervolume; on test {reach_test} of {len(ratio_test)} do. Every search finds "
            f"{min(beyond)}-{max(beyond)} front points that no grid trial dominates (on or beyond the grid's front), "
            f"with {a['searches'][0]['trials']} trials against the grid's {a['grid']['trials']}.")


def write_docs(study: dict) -> None:
    text = DOC.read_text()
    block = render(study)
    if START in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/fl_pareto")
    ap.add_argument("--docs", action="store_true", help="only rewrite docs/tune.md's section from the JSON")
    args = ap.parse_args()
    if not args.docs:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        study = run_all(Path(args.workdir))
        RESULT.write_text(json.dumps(study, indent=1))
        print(f"wrote {RESULT}")
    study = json.loads(RESULT.read_text())
    write_docs(study)
    print(render(study))


if __name__ == "__main__":
    main()
