"""The reproduction verdicts of docs/, written from the result JSON files (never typed by hand).

    python benchmarks/verdicts.py            # rewrite every generated block in docs/
    python benchmarks/verdicts.py --check    # exit 1 if a block in docs/ differs from what the JSON says (the test)

Each claim of the seed papers (docs/strategies.md, docs/expanse_trajectory.md, docs/language_models.md) is judged by
paired differences over seeds (or draws): for each comparison, the difference A − B per seed, its mean ± sd, n, a paired
t-test p-value and a bootstrap 95% interval (forgetless/platform/analysis/paired.py, the statistics `compare --seeds`
prints). A comparison is **reproduced** when the t-test rejects "no difference" at 5% and the interval excludes zero,
in the claimed direction; **not reproduced** when the same holds against it; **inconclusive** otherwise. A claim is
reproduced when all its comparisons are, not reproduced when any of them is, inconclusive otherwise. The standard
metric definitions (docs/metrics.md) are recomputed here from each seed's stored accuracy matrix R, so a result file
written under older metric names gives the same numbers.

A generated block in a docs page sits between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->`.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(<!-- generated:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)", re.S)


@dataclass
class Comparison:
    """A − B per seed, with the sign the claim expects (+1: A larger, −1: A smaller)."""

    label: str
    metric: str
    a: list[float]
    b: list[float]
    claimed_sign: int
    unit: str = "pp"  # how the table shows it: pp = percentage points of a fraction, nats, steps

    def difference(self):
        """The platform's paired statistics (analysis/paired.py), seeds numbered by position."""
        from forgetless.platform.analysis.paired import paired_difference

        records = [{"label": "A", "seed": i, "value": v} for i, v in enumerate(self.a)]
        records += [{"label": "B", "seed": i, "value": v} for i, v in enumerate(self.b)]
        return paired_difference(records, "A", "B", "value", "higher" if self.claimed_sign > 0 else "lower")

    def stats(self) -> dict:
        d = self.difference()
        return {"mean": d.mean, "sd": d.sd, "n": d.n, "p_value": d.p_value, "ci95": (d.ci_low, d.ci_high)}

    def verdict(self) -> str:
        """The platform's rule (analysis/paired.verdict): the paired t-test rejects no difference at 5% and the
        bootstrap interval excludes 0; in the claimed direction = reproduced, against it = not reproduced."""
        from forgetless.platform.analysis.paired import verdict

        return {"better": "reproduced", "worse": "not reproduced"}.get(verdict(self.difference()), "inconclusive")


@dataclass
class Claim:
    name: str  # the docs block
    title: str
    source: str  # the result file(s), as the docs cite them
    comparisons: list[Comparison]
    notes: list[str] = field(default_factory=list)

    def verdict(self) -> str:
        verdicts = [c.verdict() for c in self.comparisons]
        if not verdicts:
            return "inconclusive"
        if all(v == "reproduced" for v in verdicts):
            return "reproduced"
        if any(v == "not reproduced" for v in verdicts):
            return "not reproduced"
        return "inconclusive"


# ---------------------------------------------------------------------------------------------------------------------
# standard metrics from a stored accuracy matrix (docs/metrics.md): task 0 = source, targets 1..T


def acc_targets(R: list[list[float]]) -> float:
    """ACC (A_T): mean over the target tasks of the last row."""
    return sum(R[-1][1:]) / (len(R[-1]) - 1)


def source_forgetting(R: list[list[float]]) -> float:
    """max_{l<T} R[l][0] − R[T][0]."""
    return max(row[0] for row in R[:-1]) - R[-1][0]


def chaudhry_forgetting(R: list[list[float]]) -> float:
    """Mean over tasks j < T (source included) of max_{j≤l<T} R[l][j] − R[T][j]."""
    T = len(R) - 1
    return sum(max(R[l][j] for l in range(j, T)) - R[T][j] for j in range(T)) / T


# ---------------------------------------------------------------------------------------------------------------------
# the claims


def _by_seed(runs: list[dict]) -> dict[int, dict]:
    return {int(r["seed"]): r for r in runs}


def _paired(runs_a: list[dict], runs_b: list[dict], value: Callable[[dict], float]) -> tuple[list, list]:
    a, b = _by_seed(runs_a), _by_seed(runs_b)
    seeds = sorted(set(a) & set(b))
    return [value(a[s]) for s in seeds], [value(b[s]) for s in seeds]


def input_space_claim(path: Path, name: str, stream: str, subject: str = "input_space",
                      evaluation: str = "task-incremental") -> Claim | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    runs = next(iter(data.values()))
    runs = {("input_space" if label == subject else label): rs for label, rs in runs.items()}
    comps = []
    for other in ("finetune", "ewc", "lwf"):
        if other in runs:
            a, b = _paired(runs["input_space"], runs[other], lambda r: acc_targets(r["R"]))
            comps.append(Comparison(f"input_space − {other}", "ACC (targets, test)", a, b, +1))
    zero = max(chaudhry_forgetting(r["R"]) for r in runs["input_space"])
    notes = [f"Stream: {stream}; {len(runs['input_space'])} seeds; {evaluation} evaluation ({subject}); ACC = mean over the "
             f"targets of the last row of R (the source is not one of the averaged tasks). Largest forgetting of "
             f"input_space over the seeds (Chaudhry, source included): {100 * zero:.2f} pp."]
    if "lwf" in runs:
        notes.append("The claim (STRATEGIES.md) is against finetune and EWC; LwF is shown as the strongest baseline "
                     "here and does not count towards the verdict.")
        comps_claim = [c for c in comps if not c.label.endswith("lwf")]
        claim = Claim(name, "input_space beats sequential finetune and EWC on ACC", path.name, comps_claim, notes)
        claim.extra = [c for c in comps if c.label.endswith("lwf")]  # type: ignore[attr-defined]
        return claim
    return Claim(name, "input_space beats sequential finetune and EWC on ACC", path.name, comps, notes)


def fast_claim(path: Path, name: str) -> Claim | None:
    if not path.exists():
        return None
    runs = next(iter(json.loads(path.read_text()).values()))
    budgets = {label: sorted({r.get("optimizer_steps") for r in rs}) for label, rs in runs.items()}
    comps = []
    for other in ("finetune", "lp_ft"):
        # steps to 90% of the best target accuracy; a run that never got there counts its whole budget + 1
        a, b = _paired(runs["fast"], runs[other], lambda r: _steps(r))
        comps.append(Comparison(f"fast − {other}", "optimizer steps to 90% of best target acc", a, b, -1, "steps"))
        a, b = _paired(runs["fast"], runs[other], lambda r: r["source/auc"])
        comps.append(Comparison(f"fast − {other}", "area under the source-accuracy curve", a, b, +1))
        if "history" in runs["fast"][0]:
            a, b = _paired(runs["fast"], runs[other], _early_source)
            comps.append(Comparison(f"fast − {other}", f"mean source val acc, first {EARLY_STEPS} steps", a, b, +1))
    equal = len({tuple(v) for v in budgets.values()}) == 1
    aligns = [next((p["steps"] for p in r.get("phase_log", []) if p["phase"] == "align"), None) for r in runs["fast"]]
    fairness = "equal budgets" if equal else "UNEQUAL budgets: the comparison is not at equal cost"
    notes = [f"Optimizer steps each strategy used: {budgets} ({fairness}). A run that never reached 90% counts its "
             f"budget + 1 steps."]
    if any(a is not None for a in aligns):
        notes.append(f"FAST's align phase, steps per seed: {aligns} (it ends on its plateau rule, or at align_max_steps: "
                     f"a phase as long as align_max_steps means the plateau rule never fired).")
    return Claim(name, "FAST learns the target faster and forgets the source slower than finetune and lp_ft",
                 path.name, comps, notes)


EARLY_STEPS = 20  # "forgets before it has learned anything": the source during the first steps of the transfer


def _early_source(run: dict) -> float:
    """Mean source validation accuracy over the evaluation points of the first EARLY_STEPS steps (step 0 excluded)."""
    points = [h["acc"]["0"] for h in run["history"] if 0 < h["step"] <= EARLY_STEPS]
    return sum(points) / len(points)


def _steps(run: dict) -> float:
    steps = run.get("steps_to/90")
    return float(run.get("optimizer_steps", 0)) + 1 if steps is None or math.isnan(steps) else float(steps)


def early_stop_claim(path: Path, name: str) -> Claim | None:
    if not path.exists():
        return None
    analysis = json.loads(path.read_text())["analysis"]
    draws = analysis["per_draw"]
    comp = Comparison("searched stop point − best-source stop point", "target test acc (per draw)",
                      [d["searched"] for d in draws], [d["best_source"] for d in draws], +1)
    src = analysis["source_val_acc"]
    peak = max(src, key=lambda e: src[e])
    notes = ["Source validation accuracy by stop point: "
             + ", ".join(f"e{e} {100 * v:.1f}%" for e, v in src.items())
             + f"; its peak is at epoch {peak}"
             + (" — the last stop point, so no stop point lies past the source's optimum and the claim cannot show."
                if int(peak) == max(int(e) for e in src) else ".")]
    by_stop = analysis.get("target_test_acc_by_stop_point", {})
    if by_stop:
        notes.append("Target test accuracy by stop point, each with the rate validation prefers, mean over draws: "
                     + ", ".join(f"e{e} {100 * v['mean']:.1f}%" for e, v in by_stop.items())
                     + f". The search picked stop points {[d['searched_stop_point'] for d in draws]} per draw.")
    return Claim(name, "An earlier stop point transfers better than the best source checkpoint", path.name, [comp],
                 notes)


def expanse_claim(path: Path, name: str) -> Claim | None:
    if not path.exists():
        return None
    runs: dict[str, list[dict]] = {}
    for r in json.loads(path.read_text())["runs"]:
        runs.setdefault(r["label"], []).append(r)
    comps = []
    for a_label, b_label, sign in (("expanse", "linear_probe", +1), ("expanse", "finetune", +1),
                                   ("expanse", "expanse_one_step", +1)):
        a, b = _paired(runs[a_label], runs[b_label], lambda r: r["target"])
        comps.append(Comparison(f"{a_label} − {b_label}", "target test acc", a, b, sign))
    same = all(r["source_after"] == r["source_before"] for r in runs["expanse"])
    trainable = {label: int(rs[0]["trainable"]) for label, rs in runs.items()}
    ratio = trainable.get("finetune", 0) / max(trainable.get("expanse", 1), 1)
    matched = "matched within 5%" if abs(ratio - 1) <= 0.05 else f"not matched: finetune trains {ratio:.1f}x as many"
    notes = [f"{len(runs['expanse'])} seeds. Source accuracy after == before for every expanse run: {same}. Trainable "
             f"parameters: {trainable} ({matched}); no progressive-layer baseline exists in forgetless yet, so that "
             f"comparison is not made."]
    return Claim(name, "EXPANSE on a distant target beats linear_probe, matches or beats finetune, and two-step beats "
                       "one-step", path.name, comps, notes)


def trajectory_claim(path: Path, name: str) -> Claim | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    results, args = data["results"], data["args"]
    on_test = "test_acc_at_best_step" in results[0]["methods"]["gmt"]

    def transferred(method: str) -> Callable[[dict], float]:
        if on_test:  # t chosen on validation, the accuracy of that θ₂ᵗ on test
            return lambda r: r["methods"][method]["test_acc_at_best_step"]
        return lambda r: r["methods"][method]["val_acc"][-1]  # earlier files: validation accuracy at t = T
    what = "test acc at the t chosen on validation" if on_test else f"val acc at t={args['steps']}"
    comps = []
    for a_label, b_label in (("gmt", "naive"), ("fgmt", "naive")):
        comps.append(Comparison(f"{a_label} − {b_label}", f"transferred {what}, no training",
                                [transferred(a_label)(r) for r in results], [transferred(b_label)(r) for r in results],
                                +1))
    steps = [(float(r["steps_to_target"]["gmt"]), float(r["steps_to_target"]["none"])) for r in results]
    comps.append(Comparison("from GMT − from θ₂⁰", "SGD steps to 95% of θ₁ᵀ's val acc", [s[0] for s in steps],
                            [s[1] for s in steps], -1, "steps"))
    chance = data.get("chance")
    naive = [transferred("naive")(r) for r in results]
    net = f"{args.get('backbone', 'mlp')} {args['hidden']}"
    split = data.get("selection_split") or "the same source validation set it reports on"
    notes = [f"Dataset {args['dataset']}, {net}, T={args['steps']}, {len(results)} seeds; the step t is chosen on "
             f"{split}."
             + (f" Naive transfer: {100 * sum(naive) / len(naive):.1f}% against chance {100 * chance:.1f}%."
                if chance else "")]
    return Claim(name, "GMT/FGMT transfer a trajectory without training (≫ naive) and training from it is faster",
                 path.name, comps, notes)


def lora_claim(path: Path, name: str) -> Claim | None:
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    s = report["summary"]
    comps = []
    for m in s:
        if not m.startswith("lora"):
            continue
        comps.append(Comparison(f"{m} − full", "code test loss (nats)", s[m]["target_loss"]["values"],
                                s["full"]["target_loss"]["values"], +1, "nats"))
        comps.append(Comparison(f"{m} − full", "prose test loss increase (nats)",
                                s[m]["source_loss_increase"]["values"], s["full"]["source_loss_increase"]["values"],
                                -1, "nats"))
    controls = []
    for m in ("full_frozen_emb", "full_wd"):
        if m in s:
            controls.append(Comparison(f"{m} − full", "code test loss (nats)", s[m]["target_loss"]["values"],
                                       s["full"]["target_loss"]["values"], +1, "nats"))
            controls.append(Comparison(f"{m} − full", "prose test loss increase (nats)",
                                       s[m]["source_loss_increase"]["values"],
                                       s["full"]["source_loss_increase"]["values"], -1, "nats"))
    edges = [m for m, v in s.items() if v["lr_at_grid_edge"]]
    fronts = report["fronts"]["methods"]
    notes = ["Learning rates selected on validation (seed "
             f"{report['protocol']['select_seed']}), reported on test (seeds {report['protocol']['seeds']}): "
             + ", ".join(f"{m} {v['lr']:g} (grid {', '.join(f'{x:g}' for x in v['grid'])})" for m, v in s.items())
             + (f"; still at a grid edge after widening: {edges}" if edges else "; every selected rate is inside "
                "its grid") + ".",
             "Fronts of every (lr, step) point (test split; hypervolume against one reference, larger is better): "
             + ", ".join(f"{m} {f['hypervolume']:.4f} ({f['beyond_full_front']}/{len(f['front'])} front points not "
                         f"dominated by full fine-tuning's front)" for m, f in fronts.items()) + "."]
    if controls:
        frozen = [c.stats()["mean"] for c in controls[:2]]
        lora = [c.stats()["mean"] for c in comps[:2]]
        notes.append(f"Control: full fine-tuning with the embeddings frozen (as LoRA keeps them) is "
                     f"{frozen[0]:+.3f} nats on the code loss and {frozen[1]:+.3f} nats on the prose loss increase "
                     f"against full fine-tuning, where {comps[0].label.split(' ')[0]} is {lora[0]:+.3f} and "
                     f"{lora[1]:+.3f}: the rows above say whether the frozen embeddings alone account for LoRA's "
                     f"difference at this scale.")
    claim = Claim(name, "LoRA learns less and forgets less than full fine-tuning", path.name, comps, notes)
    claim.extra = controls  # type: ignore[attr-defined]  # the controls: is it the frozen embeddings, or the rate?
    return claim


def claims() -> list[Claim]:
    found = [
        input_space_claim(RESULTS / "strategies_stream_mnist1d_5seeds.json", "verdict-input-space-mnist1d",
                          "MNIST-1D 0-3 → {4,5} → {6,7} → {8,9}, cnn1d"),
        input_space_claim(RESULTS / "strategies_stream.json", "verdict-input-space-digits",
                          "digits 0-3 → {4,5} → {6,7} → {8,9}, cnn2d"),
        input_space_claim(RESULTS / "strategies_stream_ci_5seeds.json", "verdict-input-space-ci",
                          "digits 0-3 → {4,5} → {6,7} → {8,9}, cnn2d", "input_space_ci", "class-incremental"),
        fast_claim(RESULTS / "strategies_fast_budget.json", "verdict-fast"),
        fast_claim(RESULTS / "strategies_fast.json", "verdict-fast-before"),
        early_stop_claim(RESULTS / "repro_early_stop_overfit.json", "verdict-early-stop"),
        early_stop_claim(RESULTS / "repro_early_stop.json", "verdict-early-stop-before"),
        expanse_claim(RESULTS / "expanse_expanse-digits-mnist1d_local_ratio0.7.json", "verdict-expanse"),
        expanse_claim(RESULTS / "expanse_expanse-digits-mnist1d.json", "verdict-expanse-before"),
        trajectory_claim(RESULTS / "trajectory_mnist1d_cnn1d.json", "verdict-trajectory"),
        trajectory_claim(RESULTS / "trajectory_mnist1d.json", "verdict-trajectory-mlp"),
        lora_claim(RESULTS / "lora_forgetting_protocol.json", "verdict-lora"),
    ]
    return [c for c in found if c is not None]


# ---------------------------------------------------------------------------------------------------------------------
# markdown


def _fmt(value: float, unit: str) -> str:
    if unit == "pp":
        return f"{100 * value:+.1f}"
    if unit == "nats":
        return f"{value:+.3f}"
    return f"{value:+.1f}"


def _fmt_size(value: float, unit: str) -> str:
    return _fmt(value, unit).lstrip("+")


def comparison_row(c: Comparison) -> str:
    st = c.stats()
    lo, hi = st["ci95"]
    unit = {"pp": " pp", "nats": " nats", "steps": " steps"}[c.unit]
    p = "-" if math.isnan(st["p_value"]) else "<0.001" if st["p_value"] < 0.001 else f"{st['p_value']:.3f}"
    claimed = "> 0" if c.claimed_sign > 0 else "< 0"
    return (f"| {c.label} | {c.metric} | {_fmt(st['mean'], c.unit)} ± {_fmt_size(st['sd'], c.unit)}{unit} | "
            f"{st['n']} | [{_fmt(lo, c.unit)}, {_fmt(hi, c.unit)}] | {p} | {claimed} | {c.verdict()} |")


def render(claim: Claim) -> str:
    lines = [f"**Verdict: {claim.verdict()}** — {claim.title} (`benchmarks/results/{claim.source}`).", "",
             "| comparison (A − B) | metric | mean ± sd | n | bootstrap 95% interval | paired t p | claimed | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [comparison_row(c) for c in claim.comparisons]
    for c in getattr(claim, "extra", []):
        lines.append(comparison_row(c).replace(f"| {c.verdict()} |", f"| (shown, not judged: {c.verdict()}) |"))
    for note in claim.notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def summary_table(found: list[Claim]) -> str:
    lines = ["| claim | verdict | result file |", "|---|---|---|"]
    lines += [f"| {c.title} | {c.verdict()} | `{c.source}` |" for c in found]
    return "\n".join(lines) + "\n"


def lm_study_blocks(path: Path = RESULTS / "lm_study.json") -> dict[str, str]:
    """The language-model study's front table and verdict (benchmarks/lm_study.py renders them from its JSON)."""
    if not path.exists():
        return {}
    import importlib.util

    spec = importlib.util.spec_from_file_location("lm_study", ROOT / "benchmarks" / "lm_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.docs_blocks(json.loads(path.read_text()))


def _plain_side(d: dict, sharded: bool = False) -> str:
    """The plain loop a step-cost file measured against: files before 11e2a04 had an unfused AdamW that did not clip
    (forgetless's engines clipped at 1.0: DeepSpeed's default where its config has no key). `sharded`: the loop with
    PyTorch's ZeroRedundancyOptimizer (--plain-sharded)."""
    if "clip" not in d:
        return f"{d['plain']}; AdamW, no clipping (forgetless clipped at 1.0)"
    clip = f"clip {float(d['clip'])}" if d["clip"] else "no clipping"
    optimizer = d.get("plain_optimizer", "AdamW")
    if sharded:
        return f"{d['plain']} + ZeroRedundancyOptimizer; {optimizer}, {clip} on both sides"
    return f"{d['plain']}; {optimizer}, {clip} on both sides"


def lm_step_cost_block(results: Path = RESULTS) -> dict[str, str]:
    """The language-model step-cost table (issue 30, item 5) from benchmarks/lm_step_cost.py's result files."""
    files = sorted(results.glob("lm_step_cost_*_ranks*.json"))
    if not files:
        return {}
    lines = ["| method | ranks | plain side | ZeRO stage | forgetless step s (min) | plain step s (min) | "
             "ratio, min over rounds | ratio, median over rounds | rounds x steps | result file |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for f in files:
        d = json.loads(f.read_text())
        rows = [(name, r, "plain", False) for name, r in d["ratio_of_round_medians"].items()]
        rows += [(name, r, "plain_sharded", True) for name, r in d.get("ratio_to_sharded_plain", {}).items()]
        for name, r, plain, sharded in rows:
            stage = name.removeprefix('forgetless_zero')
            extra = stage.endswith("_extra")  # (--ds-extra: the same stage with those DeepSpeed settings)
            stage = stage.removesuffix("_extra")
            if d.get("engine_stage", {}).get(name) not in (None, int(stage)):
                stage += f" (engine: ZeRO-{d['engine_stage'][name]})"
            if extra:
                stage += f", `deepspeed.extra: {d['ds_extra']}`"
            lines.append(f"| {d['method']} | {d['ranks']} | {_plain_side(d, sharded)} | {stage} | "
                         f"{d['min_step_s'][name]:.3f} | {d['min_step_s'][plain]:.3f} | {r['min']:.2f} | "
                         f"{r['median']:.2f} | {d['rounds']} x {d['steps_per_round']} | `{f.name}` |")
    return {"lm-step-cost": "\n".join(lines) + "\n"}


def blocks() -> dict[str, str]:
    found = claims()
    out = {c.name: render(c) for c in found}
    out["verdict-summary"] = summary_table(found)
    out.update(lm_study_blocks())
    out.update(lm_step_cost_block())
    return out


def rewrite(text: str, generated: dict[str, str]) -> str:
    return BLOCK.sub(lambda m: m.group(1) + generated.get(m.group("name"), m.group("body")) + m.group(4), text)


def stale_blocks(docs: Path = DOCS, generated: dict[str, str] | None = None) -> list[str]:
    """Generated blocks of docs/ whose text differs from what the result files say now."""
    generated = generated if generated is not None else blocks()
    stale = []
    for page in sorted(docs.glob("*.md")):
        for m in BLOCK.finditer(page.read_text()):
            if m.group("name") in generated and m.group("body") != generated[m.group("name")]:
                stale.append(f"{page.name}: {m.group('name')}")
            elif m.group("name") not in generated:
                stale.append(f"{page.name}: {m.group('name')} (no result file for it)")
    return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a generated block in docs/ is stale")
    args = ap.parse_args(argv)
    generated = blocks()
    if args.check:
        stale = stale_blocks(DOCS, generated)
        for s in stale:
            print(f"stale: {s} (regenerate: python benchmarks/verdicts.py)")
        return 1 if stale else 0
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        new = rewrite(text, generated)
        if new != text:
            page.write_text(new)
            print(f"rewrote {page.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
