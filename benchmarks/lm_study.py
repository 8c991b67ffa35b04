"""Keep what the model knew while it learns (issue 30, deliverable 4): which fine-tuning settings let a language
model learn new data and keep its general ability?

A 10.5 M-parameter GPT-2 pre-trained here on English prose (`models/prose-gpt2-10m`, built by
`python -m forgetless.platform.worker.lm_pretrain --out models/prose-gpt2-10m --steps 400 --n-layer 5 --n-embd 384
--n-head 6`) is fine-tuned on Python code (`python_code`) under the settings users are told to try:

- full fine-tuning at three learning rates (1e-4, 3e-4, 1e-3);
- data mixing (`replay` with `replay_tasks: [prose]`): 1 %, 5 %, 25 % of every batch's tokens are prose training
  blocks (0 % is full fine-tuning), at full fine-tuning's rate 1e-3;
- LoRA rank 8 at 1e-2 and rank 64 at 3e-3 (every linear layer, alpha = 2r): the rates selected on validation for
  these ranks in the earlier 10 M study (docs/language_models.md, "LoRA Learns Less and Forgets Less");
- EWC (lambda and Fisher below) and LwF (Li & Hoiem's T = 2, weight 1) at 1e-3;

every setting with the same seeds and the same number of optimizer steps (warm-up then cosine decay). At every
evaluation step both corpora are measured on their validation and their test blocks, and a general-ability suite the
model never trains on (`eval_tasks`: the built-in multiple-choice `stdlib_docstrings`, scored by log-likelihood) is
scored beside them.

Protocol (docs/protocol.md): every (setting, evaluation step) is one point of the learning-vs-forgetting plane (code
loss, prose loss increase from the pre-trained model), its value the mean over seeds; the Pareto front is chosen on the
**validation** blocks and each front point is reported with its **test** numbers (mean ± sd over seeds); each setting's
final point is compared with full fine-tuning at 1e-3, paired by seed (analysis/paired.py).

The training is the platform's own pieces in one process per run, two runs at a time (2 cores): the config
(`load_config`, causal_lm tasks, `eval_tasks`), `build_model`, the strategy's `phases`, `train_batches` (replay's data
mixing), `after_source` (EWC's Fisher, LwF's frozen copy), `train_step` with a torch optimizer, and the platform's
`evaluate` / `evaluate_suites`. Why not `forgetless compare`: the platform measures the test split at the end of a
stage (rows of R), and this study needs test numbers at every evaluation step (a front point can be any step); the
same comparison through `forgetless compare` is examples/lm_keep_general.yaml.

    python benchmarks/lm_study.py --model models/prose-gpt2-10m          # runs (resumes from --workdir), writes
                                                                         # benchmarks/results/lm_study.json + plot
    python benchmarks/lm_study.py --analyze                              # plot, analysis and docs again from it
    python benchmarks/verdicts.py                                        # (the docs blocks, which it also runs)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "lm_study.json"
PLOT = ROOT / "docs" / "img" / "lm_study.png"
TARGETS = ["c_attn", "c_proj", "c_fc"]
REFERENCE = "full_1e-3"  # the setting every other one is compared with, seed by seed
SUITE = "stdlib_docstrings"
EWC_FISHER_BLOCKS = 32  # prose training blocks the diagonal Fisher is estimated on


def settings(ewc_lambda: float) -> dict[str, dict]:
    """label -> {strategy name, params, lr}: the hand grid of the study."""
    out = {f"full_{lr}": {"name": "finetune", "params": {}, "lr": float(lr)} for lr in ("1e-4", "3e-4", "1e-3")}
    for share in (1, 5, 25):
        out[f"replay_{share}%"] = {"name": "replay", "lr": 1e-3, "params": {
            "share": share / 100, "replay_tasks": ["prose"], "memory_size": None}}
    out["lora_r8"] = {"name": "lora", "lr": 1e-2, "params": {"r": 8, "alpha": 16.0, "target_modules": TARGETS,
                                                            "merge_after_task": False}}
    out["lora_r64"] = {"name": "lora", "lr": 3e-3, "params": {"r": 64, "alpha": 128.0, "target_modules": TARGETS,
                                                             "merge_after_task": False}}
    out["ewc"] = {"name": "ewc", "lr": 1e-3, "params": {"ewc_lambda": ewc_lambda, "fisher_max_samples":
                                                        EWC_FISHER_BLOCKS}}
    out["lwf"] = {"name": "lwf", "lr": 1e-3, "params": {"temperature": 2.0, "distill_weight": 1.0}}
    return out


def experiment(model: str, block: int, eval_blocks: int, batch: int, mc_items: int) -> dict:
    task = {"kind": "causal_lm", "block_size": block, "max_eval_blocks": eval_blocks}
    return {"name": "lm-study", "source": {**task, "dataset": "prose", "name": "prose"},
            "targets": [{**task, "dataset": "python_code", "name": "code", "max_train_blocks": 2000}],
            "eval_tasks": [{"kind": "multiple_choice", "dataset": SUITE, "max_items": mc_items, "max_tokens": block}],
            "backbone": {"name": f"hf:{Path(model).resolve()}"},
            "train": {"epochs": 1, "lr": 1e-3, "batch_size": batch, "optimizer": "adamw"},
            "strategies": ["finetune"], "seed": 0, "pretrain": {"epochs": 1, "checkpoint_every": 1}}


# ---------------------------------------------------------------------------------------------------------------------
# one run (a process of its own)


def measure(model, tasks, suites, step: int) -> dict:
    """Both corpora's mean token loss and next-token accuracy on validation and test, and the suite's scores."""
    import torch

    from forgetless.platform.worker.evaluation import evaluate, evaluate_suites

    point = {"step": step}
    cpu = torch.device("cpu")
    for split in ("val", "test"):
        res = evaluate(model, tasks, split, 1, False, 0, 1, cpu, batch_size=32)
        point.update({f"{split}_source_loss": res[0][1], f"{split}_target_loss": res[1][1],
                      f"{split}_source_acc": res[0][0], f"{split}_target_acc": res[1][0]})
    if suites:
        scores = evaluate_suites(model, suites, "val", 0, 1, cpu, batch_size=32)[SUITE]
        point.update({"mc_acc": scores["acc"], "mc_acc_norm": scores["acc_norm"]})
    return point


def build(cfg_dict: dict, setting: dict | None, seed: int, tasks_file: str):
    import torch

    from forgetless.config import load_config
    from forgetless.platform.worker.model_io import build_model
    from forgetless.strategies import make_strategy
    from forgetless.strategies.base import task_infos

    torch.set_num_threads(1)
    cfg = load_config({**cfg_dict, "seed": seed})
    tasks = load_tasks(tasks_file)
    infos = task_infos(tasks)
    setting = setting or {"name": "finetune", "params": {}, "lr": 1e-3}
    params = {**setting["params"], **({"seed": seed} if setting["name"] == "lora" else {})}
    strategy = make_strategy(setting["name"], params, 1, setting["lr"])
    torch.manual_seed(seed)
    return cfg, tasks, infos, strategy, build_model(cfg, infos, strategy)


def suites_of(cfg, tasks_file: str):
    """The built eval suites: read from `suites.pt` beside the tasks when run_all saved them there (built once: making
    the multiple-choice items reads the standard library's sources), else built here."""
    import torch

    from forgetless.data.eval_suites import build_eval_suites

    saved = Path(tasks_file).with_name("suites.pt")
    if saved.exists():
        return torch.load(saved, weights_only=False)  # this script's own file, written by run_all
    return build_eval_suites(cfg.eval_tasks)


def run_one(cfg_dict: dict, label: str, setting: dict, seed: int, steps: int, eval_every: int,
            tasks_file: str, mc_every_point: bool = True) -> dict:
    """Fine-tune one setting for `steps` optimizer steps; measure every `eval_every` steps (step 0 is the pre-trained
    model, measured once for the whole study); the suite at every one of them or at the last only."""
    import torch

    from forgetless.platform.worker.lm_pretrain import warmup_cosine
    from forgetless.strategies.base import TrainingData
    from forgetless.strategies.optim import make_torch_optimizer
    from forgetless.strategies.training import TorchEngine, lr_scheduler, set_train_mode, set_trainable, train_step

    start = time.time()
    cfg, tasks, infos, strategy, model = build(cfg_dict, setting, seed, tasks_file)
    suites = suites_of(cfg, tasks_file)
    src = tasks[0]
    # what the strategy keeps of the pre-trained model (EWC: Fisher + anchor; LwF: the frozen copy), from prose
    # training blocks only
    fisher_order = torch.randperm(len(src.x_train), generator=torch.Generator().manual_seed(seed + 10**6))
    strategy.after_source(model, infos[0], lambda: ((src.x_train[b], src.y_train[b]) for b in
                                                     fisher_order.split(cfg.train.batch_size)), lambda t: t)
    phase = strategy.phases(model, infos[1])[0]
    n_groups = len(phase.param_groups)
    phase.lr_multipliers = lambda s: warmup_cosine(steps, max(1, steps // 10))(s) * n_groups
    set_trainable(model, phase)
    groups = [{"params": g.params, "lr": g.lr, "name": g.name} for g in phase.param_groups if g.params]
    opt = make_torch_optimizer(groups, cfg.train)
    engine = TorchEngine(model, opt, lr_scheduler(opt, phase))
    generator = torch.Generator().manual_seed(seed)
    target = tasks[1]
    splits = [t.split("train") for t in tasks]
    curve, step, epoch, train_seconds = [], 0, 0, 0.0
    while step < steps:  # epochs of the code training blocks in a seeded order, the same for every setting of a seed
        order = torch.randperm(len(target.x_train), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        own = ((target.x_train[b], target.y_train[b]) for b in order.split(cfg.train.batch_size)
               if len(b) == cfg.train.batch_size)
        data = TrainingData(splits, 0, 1, seed, seed * 1000 + epoch)
        set_train_mode(model, phase)
        t0 = time.time()
        for xb, yb in strategy.train_batches(model, infos[1], own, data):
            train_step(engine, model, strategy, phase, infos[1], xb, yb, generator)
            step += 1
            if step % eval_every == 0 or step == steps:
                train_seconds += time.time() - t0
                curve.append(measure(model, tasks, suites if mc_every_point or step == steps else [], step))
                set_train_mode(model, phase)
                t0 = time.time()
            if step == steps:
                break
        epoch += 1
    trainable = sum(p.numel() for p in phase.trainable())
    return {"label": label, "seed": seed, "lr": setting["lr"], "strategy": setting["name"],
            "params": setting["params"], "curve": curve, "trainable": trainable, "train_seconds": train_seconds,
            "seconds": time.time() - start}


def pretrained_point(cfg_dict: dict, tasks_file: str) -> dict:
    """Step 0: the pre-trained model (every setting and seed starts from it: LoRA's B is zero, heads are zero)."""
    cfg, tasks, _, _, model = build(cfg_dict, None, 0, tasks_file)
    return measure(model, tasks, suites_of(cfg, tasks_file), 0)


def ewc_fisher_sum(cfg_dict: dict, tasks_file: str) -> float:
    """Σ_i F_i of the diagonal Fisher the EWC runs use (seed 0's blocks): sizes lambda (see choose_ewc_lambda)."""
    import torch

    from forgetless.strategies.ewc import STORE

    cfg, tasks, infos, strategy, model = build(cfg_dict, {"name": "ewc", "lr": 1e-3, "params": {
        "fisher_max_samples": EWC_FISHER_BLOCKS}}, 0, tasks_file)
    src = tasks[0]
    order = torch.randperm(len(src.x_train), generator=torch.Generator().manual_seed(10**6))
    strategy.after_source(model, infos[0], lambda: ((src.x_train[b], src.y_train[b]) for b in
                                                     order.split(cfg.train.batch_size)), lambda t: t)
    store = model.extras[STORE]
    return float(sum(store.get("fisher", n).sum() for n in store.names))


def save_tasks(tasks, path: str) -> None:
    """The built tasks as plain tensors (read back with weights_only=True): built once, not per run."""
    from dataclasses import asdict

    import torch

    torch.save([{**asdict(t), "input_shape": list(t.input_shape)} for t in tasks], path)


def load_tasks(path: str):
    import torch

    from forgetless.data.tasks import TaskData

    return [TaskData(**{**d, "input_shape": tuple(d["input_shape"])}) for d in torch.load(path, weights_only=True)]


def run_all(args) -> dict:
    from forgetless.config import load_config
    from forgetless.data import build_stream

    if not Path(args.model, "config.json").exists():
        raise SystemExit(f"{args.model} is not a model folder; build it with: python -m "
                         f"forgetless.platform.worker.lm_pretrain --out {args.model} --steps 400 --n-layer 5 "
                         f"--n-embd 384 --n-head 6")
    # one folder per scale: the built tasks and the finished runs belong to these numbers
    work = Path(args.workdir) / (f"steps{args.steps}-every{args.eval_every}-batch{args.batch_size}-block"
                                 f"{args.block_size}-eval{args.eval_blocks}-mc{args.mc_items}"
                                 f"{'-final' if args.mc_final_only else ''}-{Path(args.model).name}")
    work.mkdir(parents=True, exist_ok=True)
    cfg = experiment(args.model, args.block_size, args.eval_blocks, args.batch_size, args.mc_items)
    tasks_file = str(work / "tasks.pt")
    if not Path(tasks_file).exists():
        loaded = load_config(cfg)
        save_tasks(build_stream(loaded.source, loaded.targets), tasks_file)
    if not Path(tasks_file).with_name("suites.pt").exists():
        import torch

        from forgetless.data.eval_suites import build_eval_suites

        torch.save(build_eval_suites(load_config(cfg).eval_tasks), Path(tasks_file).with_name("suites.pt"))
    state_file = work / "state.json"  # the pre-trained point and lambda, kept for a resumed study
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if "pretrained" not in state:  # the two side by side
        with ProcessPoolExecutor(args.workers) as pool:
            pre, fisher = pool.submit(pretrained_point, cfg, tasks_file), pool.submit(ewc_fisher_sum, cfg, tasks_file)
            state.update(pretrained=pre.result(), ewc_fisher_sum=fisher.result())
        state_file.write_text(json.dumps(state))
    ewc_lambda = args.ewc_lambda or choose_ewc_lambda(state["ewc_fisher_sum"])
    grid = settings(ewc_lambda)
    runs_file = work / "runs.jsonl"  # one finished run a line: a resumed study skips them
    runs = [json.loads(x) for x in runs_file.read_text().splitlines()] if runs_file.exists() else []
    done = {(r["label"], r["seed"]) for r in runs}
    todo = [(label, seed) for seed in args.seeds for label in grid
            if (label, seed) not in done and (not args.only or label in args.only)]
    start = time.time()
    print(f"{len(todo)} runs to go ({len(done)} done), {args.workers} at a time", flush=True)
    with ProcessPoolExecutor(args.workers) as pool:
        futures = {pool.submit(run_one, cfg, label, grid[label], seed, args.steps, args.eval_every, tasks_file,
                               not args.mc_final_only):
                   (label, seed) for label, seed in todo}
        for f in as_completed(futures):
            run = f.result()
            runs.append(run)
            with runs_file.open("a") as fh:
                fh.write(json.dumps(run) + "\n")
            end = run["curve"][-1]
            print(f"[{time.time() - start:5.0f} s] {run['label']} seed {run['seed']}: {run['seconds']:.0f} s, code "
                  f"{end['val_target_loss']:.3f}, prose {end['val_source_loss']:.3f}, mc {end.get('mc_acc')}",
                  flush=True)
    return {"protocol": {k: v for k, v in vars(args).items() if k not in ("analyze",)}, "experiment": cfg,
            "settings": grid, "ewc_lambda": ewc_lambda, "ewc_fisher_sum": state["ewc_fisher_sum"],
            "pretrained": state["pretrained"], "reference": REFERENCE, "runs": sorted(runs, key=lambda r: (
                list(grid).index(r["label"]), r["seed"])), "wall_seconds_this_invocation": time.time() - start,
            "cpus": os.cpu_count()}


def choose_ewc_lambda(fisher_sum: float) -> float:
    """EWC's lambda from the Fisher's size, not tuned on the results: lambda/2 · Σ F · δ² = 1 nat when every weight
    moves by δ = 1e-2 (about what 60 AdamW steps at 1e-3 move a weight), rounded to a power of ten. So the penalty is
    of the size of the task loss's changes at the rate EWC trains with."""
    delta = 1e-2
    return float(10 ** round(math.log10(2.0 / (fisher_sum * delta ** 2))))


# ---------------------------------------------------------------------------------------------------------------------
# the analysis (pure: numbers from the JSON)

OBJECTIVES = [("target", "min"), ("forgetting", "min")]


def _mean_sd(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return {"mean": mean, "sd": sd, "n": n}


def points(report: dict) -> list[dict]:
    """Every (setting, evaluation step): mean over seeds of the code loss and the prose loss increase from the
    pre-trained model (nats), on validation and on test, and the suite's accuracy; the pre-trained model is the
    step-0 point of every setting (listed once)."""
    pre = report["pretrained"]
    by: dict[tuple[str, int], list[dict]] = {}
    for r in report["runs"]:
        for p in r["curve"]:
            by.setdefault((r["label"], p["step"]), []).append(p)
    out = [{"label": "pre-trained", "step": 0, "n": 1,
            **{f"{s}_{k}": v for s in ("val", "test") for k, v in (
                ("target", pre[f"{s}_target_loss"]), ("forgetting", 0.0),
                ("target_sd", 0.0), ("forgetting_sd", 0.0))},
            "mc_acc": pre.get("mc_acc"), "mc_acc_sd": 0.0}]
    for (label, step), ps in by.items():
        row = {"label": label, "step": step, "n": len(ps)}
        for s in ("val", "test"):
            t = _mean_sd([p[f"{s}_target_loss"] for p in ps])
            f = _mean_sd([p[f"{s}_source_loss"] - pre[f"{s}_source_loss"] for p in ps])
            row.update({f"{s}_target": t["mean"], f"{s}_target_sd": t["sd"], f"{s}_forgetting": f["mean"],
                        f"{s}_forgetting_sd": f["sd"]})
        if all("mc_acc" in p for p in ps):
            m = _mean_sd([p["mc_acc"] for p in ps])
            row.update({"mc_acc": m["mean"], "mc_acc_sd": m["sd"]})
        out.append(row)
    return out


def front(pts: list[dict], split: str = "val") -> list[int]:
    """Indices of the points on the Pareto front of (code loss, prose loss increase) on `split`, both minimised."""
    from forgetless.platform.analysis.pareto import pareto_front

    return pareto_front([{"target": p[f"{split}_target"], "forgetting": p[f"{split}_forgetting"]} for p in pts],
                        OBJECTIVES)


def hypervolume(pts: list[dict], chosen: list[int], split: str, reference: dict) -> float:
    from forgetless.platform.analysis.pareto import hypervolume_2d

    return hypervolume_2d([{"target": pts[i][f"{split}_target"], "forgetting": pts[i][f"{split}_forgetting"]}
                           for i in chosen], OBJECTIVES, reference)


def final_values(report: dict) -> dict[str, list[dict]]:
    """Per setting, per seed: the final step's test code loss, prose loss increase and suite accuracy drop."""
    pre = report["pretrained"]
    out: dict[str, list[dict]] = {}
    for r in report["runs"]:
        end = r["curve"][-1]
        out.setdefault(r["label"], []).append({
            "label": r["label"], "seed": r["seed"], "code_loss": end["test_target_loss"],
            "prose_loss_increase": end["test_source_loss"] - pre["test_source_loss"],
            "mc_forgetting": pre["mc_acc"] - end["mc_acc"] if "mc_acc" in end else None})
    return out


PAIRED_METRICS = [("code_loss", "lower", "code test loss (nats)"),
                  ("prose_loss_increase", "lower", "prose test loss increase (nats)"),
                  ("mc_forgetting", "lower", f"{SUITE} accuracy drop (pp)")]


def paired(report: dict) -> list[dict]:
    """Each setting's final point − full fine-tuning at 1e-3's, paired by seed (analysis/paired.py)."""
    from forgetless.platform.analysis.paired import paired_difference, verdict

    finals = final_values(report)
    records = [r for rs in finals.values() for r in rs]
    out = []
    for label in finals:
        if label == report["reference"]:
            continue
        for metric, better, name in PAIRED_METRICS:
            d = paired_difference(records, label, report["reference"], metric, better)
            if d is not None:
                out.append({**d.to_dict(), "name": name, "verdict": verdict(d)})
    return out


def analyse(report: dict) -> dict:
    pts = points(report)
    chosen = front(pts, "val")
    every = [p for p in pts]
    reference = {"target": max(max(p["val_target"], p["test_target"]) for p in every),
                 "forgetting": max(max(p["val_forgetting"], p["test_forgetting"]) for p in every)}
    per_setting = {}
    for label in dict.fromkeys(p["label"] for p in pts):
        own = [i for i, p in enumerate(pts) if p["label"] in (label, "pre-trained")]
        sub = [pts[i] for i in own]
        f = [own[i] for i in front(sub, "val")]
        per_setting[label] = {"front": f, "hv_test": hypervolume(pts, f, "test", reference)}
    return {"points": pts, "front": chosen, "reference": reference,
            "hv_val": hypervolume(pts, chosen, "val", reference), "hv_test": hypervolume(pts, chosen, "test", reference),
            "test_front_agrees": sorted(front(pts, "test")) == sorted(chosen),
            "per_setting": per_setting, "paired": paired(report)}


def plot(report: dict, analysis: dict, path: Path) -> None:
    """Left: every (setting, step) point on validation, each setting's steps joined, the front chosen there; right:
    the same points on test, the validation-chosen front's test values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts, chosen = analysis["points"], analysis["front"]
    labels = [lb for lb in dict.fromkeys(p["label"] for p in pts) if lb != "pre-trained"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=False)
    for ax, split in zip(axes, ("val", "test")):
        for i, label in enumerate(labels):
            own = sorted([p for p in pts if p["label"] == label], key=lambda p: p["step"])
            own = [pts[0]] + own
            ax.plot([p[f"{split}_target"] for p in own], [p[f"{split}_forgetting"] for p in own],
                    "-o" if i < 10 else "--s", ms=3, color=f"C{i % 10}", alpha=0.75, lw=1, label=label)
        fr = sorted((pts[i] for i in chosen), key=lambda p: p[f"{split}_target"])
        ax.plot([p[f"{split}_target"] for p in fr], [p[f"{split}_forgetting"] for p in fr], "--", color="k", lw=1.5,
                label="front (chosen on validation)")
        ax.scatter([p[f"{split}_target"] for p in fr], [p[f"{split}_forgetting"] for p in fr], s=70,
                   facecolors="none", edgecolors="k", zorder=5)
        for p in fr:
            if p["label"] != "pre-trained":
                ax.annotate(f"{p['label']}@{p['step']}", (p[f"{split}_target"], p[f"{split}_forgetting"]),
                            fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.invert_xaxis()
        ax.set_xlabel(f"code {split} loss (nats/token; right = learned more)")
        ax.set_ylabel(f"prose {split} loss increase\nfrom the pre-trained model (nats; up = forgot more)", fontsize=8)
        ax.set_title(f"{'validation: the front is chosen here' if split == 'val' else 'test: the chosen points'}",
                     fontsize=9)
    axes[0].legend(fontsize=6, loc="upper left")
    n_seeds = len({r["seed"] for r in report["runs"]})
    fig.suptitle(f"Every (setting, evaluation step), mean of {n_seeds} seeds: 10.5 M decoder, prose -> code",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# the docs blocks (benchmarks/verdicts.py writes them into docs/language_models.md)


def _p(v: float) -> str:
    return "-" if v is None or math.isnan(v) else "<0.001" if v < 0.001 else f"{v:.3f}"


def _pm(mean: float, sd: float, fmt: str = "{:.3f}") -> str:
    return fmt.format(mean) + ("" if sd is None or math.isnan(sd) else " ± " + fmt.format(sd).lstrip("+"))


def docs_blocks(report: dict) -> dict[str, str]:
    """{block name: markdown}: the study's front table (`lm-study`) and its paired statistics with the verdict
    (`verdict-lm-study`)."""
    a = analyse(report)
    pts, proto = a["points"], report["protocol"]
    seeds = sorted({r["seed"] for r in report["runs"]})
    lines = [f"{len(report['runs'])} runs ({len(report['settings'])} settings x seeds {seeds}), {proto['steps']} "
             f"optimizer steps of {proto['batch_size']} x {proto['block_size']} tokens each, measured every "
             f"{proto['eval_every']} steps on {proto['eval_blocks']} validation and {proto['eval_blocks']} test blocks "
             f"per corpus and {proto['mc_items']} `{SUITE}` items (4 choices, chance 25 %). Pre-trained model: code "
             f"test loss {report['pretrained']['test_target_loss']:.3f}, prose test loss "
             f"{report['pretrained']['test_source_loss']:.3f} nats, `{SUITE}` accuracy "
             f"{100 * report['pretrained'].get('mc_acc', float('nan')):.1f} %. EWC's lambda "
             f"{report['ewc_lambda']:g} (Fisher sum {report['ewc_fisher_sum']:.3g}).", "",
             "The Pareto front of every (setting, step) point, **chosen on validation** (code loss, prose loss "
             "increase; means over seeds), **reported on test** (mean ± sd over seeds):", "",
             "| setting | step | val code loss | val prose loss increase | **test code loss** | **test prose loss "
             "increase** | suite acc % |", "|---|---|---|---|---|---|---|"]
    for i in a["front"]:
        p = pts[i]
        mc = "-" if p.get("mc_acc") is None else _pm(100 * p["mc_acc"], 100 * p["mc_acc_sd"], "{:.1f}")
        lines.append(f"| {p['label']} | {p['step']} | {p['val_target']:.3f} | {p['val_forgetting']:+.3f} | "
                     f"{_pm(p['test_target'], p['test_target_sd'])} | "
                     f"{_pm(p['test_forgetting'], p['test_forgetting_sd'], '{:+.3f}')} | {mc} |")
    off = [lb for lb in report["settings"] if not any(pts[i]["label"] == lb for i in a["front"])]
    lines += ["", f"Never on the front (at any step): {', '.join(off) if off else 'none'}. The front chosen on test "
                  f"would be {'the same points' if a['test_front_agrees'] else 'different points'}. Hypervolume of "
                  f"the front (reference: the worst code loss and prose increase of any point) on validation "
                  f"{a['hv_val']:.4f}, on test {a['hv_test']:.4f} nats²; each setting's own front with the "
                  f"pre-trained point, on test: "
                  + ", ".join(f"{lb} {v['hv_test']:.4f}" for lb, v in a["per_setting"].items()
                              if lb != "pre-trained") + "."]
    cost = {}
    for r in report["runs"]:
        cost.setdefault(r["label"], []).append(r["train_seconds"])
    lines += ["", "Final step, every setting (test, mean ± sd over seeds): "
              + "; ".join(f"{lb} code {_pm(p['test_target'], p['test_target_sd'])}, prose "
                          f"{_pm(p['test_forgetting'], p['test_forgetting_sd'], '{:+.3f}')}"
                          for lb in report["settings"] for p in pts
                          if p["label"] == lb and p["step"] == proto["steps"]) + ".",
              "", "Training seconds per run (median, one core each, shared machine): "
              + ", ".join(f"{lb} {sorted(v)[len(v) // 2]:.0f}" for lb, v in cost.items()) + "."]
    table = "\n".join(lines) + "\n"
    return {"lm-study": table, "verdict-lm-study": verdict_block(report, a)}


def verdict_block(report: dict, a: dict) -> str:
    pts = a["points"]
    on_front = list(dict.fromkeys(pts[i]["label"] for i in a["front"] if pts[i]["label"] != "pre-trained"))
    lines = [f"**Verdict (chosen on validation, reported on test):** on the front: "
             + ", ".join(f"{lb} (steps {', '.join(str(pts[i]['step']) for i in a['front'] if pts[i]['label'] == lb)})"
                         for lb in on_front) + ".", "",
             f"Each setting's final point against {report['reference']} (same seeds, same data order; the difference "
             f"setting − {report['reference']} per seed; `better`/`worse` when the paired t-test gives p < 0.05 and "
             f"the bootstrap 95 % interval excludes 0, else `not shown`):", "",
             "| setting | metric | mean ± sd | n | bootstrap 95 % interval | paired t p | verdict |",
             "|---|---|---|---|---|---|---|"]
    for d in a["paired"]:
        scale, fmt = (100, "{:+.1f}") if d["metric"] == "mc_forgetting" else (1, "{:+.3f}")
        sd = "" if d["sd"] is None or math.isnan(d["sd"]) else " ± " + fmt.format(scale * d["sd"]).lstrip("+")
        lines.append(f"| {d['label']} | {d['name']} | {fmt.format(scale * d['mean'])}{sd} | {d['n']} | "
                     f"[{fmt.format(scale * d['ci_low'])}, {fmt.format(scale * d['ci_high'])}] | {_p(d['p_value'])} | "
                     f"{d['verdict']} |")
    better = [d for d in a["paired"] if d["verdict"] == "better" and d["metric"] == "prose_loss_increase"]
    worse = [d for d in a["paired"] if d["verdict"] == "worse" and d["metric"] == "code_loss"]
    lines += ["", "Forgets less prose than " + report["reference"] + " (shown): "
              + (", ".join(d["label"] for d in better) or "none") + "; learns less code (shown): "
              + (", ".join(d["label"] for d in worse) or "none") + "."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/prose-gpt2-10m")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--eval-blocks", type=int, default=16, help="validation and test blocks per corpus")
    ap.add_argument("--mc-items", type=int, default=60, help=f"{SUITE} items scored at every evaluation")
    ap.add_argument("--mc-final-only", action="store_true", help=f"score {SUITE} at each run's last step only")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ewc-lambda", type=float, default=None, help="default: from the Fisher's size")
    ap.add_argument("--workers", type=int, default=2, help="runs at a time (one core each)")
    ap.add_argument("--workdir", default="/tmp/fl_lm_study", help="built tasks and finished runs, a folder per scale "
                                                                   "(a rerun resumes)")
    ap.add_argument("--out", default=str(RESULT))
    ap.add_argument("--plot", default=str(PLOT))
    ap.add_argument("--only", nargs="+", help="run only these settings (a timing probe)")
    ap.add_argument("--analyze", action="store_true", help="only the analysis and plot, from --out")
    return ap.parse_args(argv)


DOC = ROOT / "docs" / "language_models.md"
SLOT = "<!-- lm-study results: benchmarks/lm_study.py puts them here once benchmarks/results/lm_study.json exists -->"
BLOCKS = ("<!-- generated:lm-study -->\n<!-- /generated:lm-study -->\n\n<!-- generated:verdict-lm-study -->\n"
          "<!-- /generated:verdict-lm-study -->\n\n![every (setting, evaluation step) of the study, the front chosen on "
          "validation, its test values](img/lm_study.png)")


def write_docs() -> None:
    """The study's generated blocks in docs/language_models.md (placed at SLOT the first time), filled from
    benchmarks/results/lm_study.json by benchmarks/verdicts.py, the one writer of generated blocks."""
    import importlib.util

    text = DOC.read_text()
    if "<!-- generated:lm-study -->" not in text and SLOT in text:
        DOC.write_text(text.replace(SLOT, BLOCKS))
    spec = importlib.util.spec_from_file_location("verdicts", ROOT / "benchmarks" / "verdicts.py")
    verdicts = importlib.util.module_from_spec(spec)
    sys.modules["verdicts"] = verdicts  # its dataclasses look their module up there
    spec.loader.exec_module(verdicts)
    verdicts.main([])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.analyze:
        report = json.loads(Path(args.out).read_text())
    else:
        report = run_all(args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    a = analyse(report)
    plot(report, a, Path(args.plot))
    print(docs_blocks(report)["lm-study"])
    print(docs_blocks(report)["verdict-lm-study"])
    print(f"wrote {args.out} and {args.plot}")
    if Path(args.out).resolve() == RESULT:
        write_docs()


if __name__ == "__main__":
    main()
