"""Does a two-objective search find the hand grid's learning-vs-forgetting front with fewer trials? (issue 31, item 5)

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

`--study lm` (item 5b) is the same comparison on the language-model study of docs/language_models.md
(examples/lm_keep_general.yaml, the 10.5 M decoder learning code): full fine-tuning's learning rate x the share of
prose mixed into every batch (`replay`, share 0 = plain fine-tuning), target next-token accuracy (max) vs the prose's
next-token accuracy lost (min): the hand grid of 3 rates x 4 shares (12 trials) against multi-objective TPE over a
log range of the rates and a range of the shares, 4 trials (33 %), search seeds 0, 1, 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "tune.md"
TRADE_OFF = [("target/acc", "max"), ("source/forgetting", "min")]
OBJECTIVES = [{"metric": m, "direction": d} for m, d in TRADE_OFF]
SEEDS = [0, 1, 2]


@dataclass(frozen=True)
class Study:
    """One hand grid and its searches: which config, which space, where the JSON and the docs block go."""

    config: Path
    overrides: list[str]
    grid_space: dict
    search_space: dict
    search_trials: int
    result: Path
    grid_label: str
    script_args: str  # how the docs name the command that writes the block
    strategy: str | None = None  # the config's strategy the trials use (when it lists several)
    workdir: str = "/tmp/fl_pareto"

    @property
    def marker(self) -> str:  # pareto-study, pareto-study:lm
        return "pareto-study" + self.script_args.replace(" --study ", ":")

    @property
    def start(self) -> str:
        return f"<!-- {self.marker}:start (benchmarks/pareto_study.py{self.script_args} --docs) -->"

    @property
    def end(self) -> str:
        return f"<!-- {self.marker}:end -->"

    def grid_search(self) -> dict:
        return {"space": self.grid_space, "searcher": "grid", "objectives": OBJECTIVES,
                **({"strategy": self.strategy} if self.strategy else {})}

    def optuna_search(self, seed: int) -> dict:
        return {"space": self.search_space, "searcher": "optuna", "sampler": "tpe", "num_samples": self.search_trials,
                "seed": seed, "objectives": OBJECTIVES, **({"strategy": self.strategy} if self.strategy else {})}


GRID_LRS = [0.0003, 0.001, 0.003, 0.01]
EARLY_STOP = Study(
    config=ROOT / "examples" / "early_stop_search.yaml",
    overrides=["scaling.num_workers=1"],  # two one-worker trials at a time on a 2-core machine
    grid_space={"stop_point": "all", "train.lr": GRID_LRS},
    search_space={"stop_point": "all", "train.lr": {"low": GRID_LRS[0], "high": GRID_LRS[-1], "log": True}},
    search_trials=6, result=ROOT / "benchmarks" / "results" / "pareto_study.json",
    grid_label=f"hand grid (4 stop points x {len(GRID_LRS)} rates)", script_args="")
LM_LRS, LM_SHARES = [0.0001, 0.0003, 0.001], [0.0, 0.01, 0.05, 0.25]
LM = Study(
    config=ROOT / "examples" / "lm_keep_general.yaml",
    # the example's comparison as trials: one worker each (two at a time), 16 optimizer steps, no curves (the trial's
    # numbers are its end of training), no suite (the objectives are the corpora's)
    # (and the decoder by its absolute path: the searches run in their work folder, where the example's relative
    # `hf:models/prose-gpt2-10m` names nothing)
    overrides=["scaling.num_workers=1", "train.step_budget=16", "train.eval_every_steps=null", "eval_tasks=[]",
               f"backbone.name=hf:{ROOT / 'models' / 'prose-gpt2-10m'}"],
    grid_space={"stop_point": [1], "train.lr": LM_LRS, "strategy.share": LM_SHARES},
    search_space={"stop_point": [1], "train.lr": {"low": LM_LRS[0], "high": LM_LRS[-1], "log": True},
                  "strategy.share": {"low": LM_SHARES[0], "high": LM_SHARES[-1]}},
    search_trials=4, result=ROOT / "benchmarks" / "results" / "lm_pareto_study.json",
    grid_label=f"hand grid ({len(LM_LRS)} rates x {len(LM_SHARES)} prose shares)", script_args=" --study lm",
    strategy="replay_prose5", workdir="/tmp/fl_lm_pareto")
STUDIES = {"early_stop": EARLY_STOP, "lm": LM}
# the early-stopping study's names, as before
CONFIG, RESULT, OVERRIDES, SEARCH_TRIALS = EARLY_STOP.config, EARLY_STOP.result, EARLY_STOP.overrides, \
    EARLY_STOP.search_trials
START, END = EARLY_STOP.start, EARLY_STOP.end


def grid_search() -> dict:
    return EARLY_STOP.grid_search()


def optuna_search(seed: int) -> dict:
    return EARLY_STOP.optuna_search(seed)


def _points(res, split: str) -> list[dict]:
    return [{"trial_id": t.trial_id, **t.params, **{m: t.metrics.get(f"{split}/{m}") for m, _ in TRADE_OFF}}
            for t in res.trials if t.status == "finished"]


def summarise(res, wall: float) -> dict:
    front = res.pareto()
    return {"name": res.name, "parent_run_id": res.parent_run_id, "trials": len(res.trials), "wall_seconds": wall,
            "val": _points(res, "val"), "test": _points(res, "test"), "front": front.trial_ids}


def run_all(workdir: Path, study: Study = EARLY_STOP) -> dict:
    import forgetless

    os.chdir(workdir)  # its own MLflow store and storage; every search reuses the one pre-training
    out: dict = {"config": str(study.config.relative_to(ROOT)), "overrides": study.overrides,
                 "machine": platform.node(), "cpus": os.cpu_count(), "grid_search": study.grid_search(),
                 "grid": None, "searches": []}
    t0 = time.perf_counter()
    res = forgetless.tune(str(study.config), search=study.grid_search(), resume=True, overrides=study.overrides)
    out["grid"] = summarise(res, time.perf_counter() - t0)
    for seed in SEEDS:
        t0 = time.perf_counter()
        res = forgetless.tune(str(study.config), search=study.optuna_search(seed), resume=True,
                              overrides=study.overrides)
        out["searches"].append({"seed": seed, "search": study.optuna_search(seed),
                                **summarise(res, time.perf_counter() - t0)})
        study.result.write_text(json.dumps(out, indent=1))  # what has run so far, in case the rest cannot
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


def render(study: dict, spec: Study = EARLY_STOP) -> str:
    a = analyse(study)
    g, ref = a["grid"], a["reference"]
    lines = [spec.start, "",
             f"Reference point (shared): target accuracy {100 * ref['target/acc']:.1f} %, source forgetting "
             f"{100 * ref['source/forgetting']:.1f} points (the worst of every trial). Hypervolume in "
             f"(percentage points)², of the front chosen on validation, measured on validation and on test.", "",
             "| search | trials | front points | not dominated by the grid (val) | hypervolume val | hypervolume test "
             "| wall s |", "|---|---|---|---|---|---|---|",
             f"| {spec.grid_label} | {g['trials']} | {g['front_points']} | - | "
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
    return "\n".join(lines + ["", spec.end])


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


def write_docs(study: dict, spec: Study = EARLY_STOP) -> None:
    text = DOC.read_text()
    block = render(study, spec)
    slot = f"<!-- {spec.marker}: results go here -->"
    if spec.start in text:
        text = text[:text.index(spec.start)] + block + text[text.index(spec.end) + len(spec.end):]
    elif slot in text:
        text = text.replace(slot, block)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=sorted(STUDIES), default="early_stop")
    ap.add_argument("--workdir", default=None, help="default: /tmp/fl_pareto (early_stop), /tmp/fl_lm_pareto (lm)")
    ap.add_argument("--docs", action="store_true", help="only rewrite docs/tune.md's section from the JSON")
    args = ap.parse_args()
    spec = STUDIES[args.study]
    if not args.docs:
        workdir = Path(args.workdir or spec.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        study = run_all(workdir, spec)
        spec.result.write_text(json.dumps(study, indent=1))
        print(f"wrote {spec.result}")
    study = json.loads(spec.result.read_text())
    write_docs(study, spec)
    print(render(study, spec))


if __name__ == "__main__":
    main()
