"""Small-scale reproduction of "LoRA Learns Less and Forgets Less" (Biderman et al., 2024, TMLR).

Their claim: fine-tuning a pre-trained LM on a new domain (code, math) with LoRA reaches a worse target loss than full
fine-tuning (learns less) but keeps more of the source-domain ability (forgets less); plotted as source vs target
metric over training (the learning-forgetting curve), LoRA and full fine-tuning lie close to one trade-off curve,
LoRA sitting at its less-learned, less-forgotten end, and higher ranks move towards full fine-tuning.

Here: a GPT-2-style decoder pre-trained from scratch on the built-in English `prose` corpus
(`python -m forgetless.platform.worker.lm_pretrain`), fine-tuned on the built-in `python_code` corpus under full fine-tuning
(`finetune`) and `lora` with ranks 8, 64, 256 (alpha = 2r, every linear layer: c_attn, c_proj, c_fc), the same number of
steps for all. The learning rate of each method is chosen by a Ray Tune grid search on seed 0 (lowest final code
validation loss); then every method runs the other seeds at its chosen rate. Every `--eval-every` steps the
validation mean token loss on both corpora is recorded: the learning-forgetting curve.

The training is the platform's own: the config path (`load_config`, task kind causal_lm), `build_model`, the strategies'
phases and `train_step` with a torch optimizer (`TorchEngine`), in one process per trial (no DeepSpeed: the same
update, measured without the platform's fixed costs on a 2-core machine).

    python benchmarks/lora_forgetting.py --model models/prose-gpt2 --steps 120 --seeds 0 1 2

Writes benchmarks/results/lora_forgetting.json and docs/img/lora_forgetting.png (or --out / --plot), prints a markdown
table. docs/language_models.md has the commands and results for the 4.24 M and the 10.5 M decoder.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results" / "lora_forgetting.json"
PLOT = Path(__file__).parent.parent / "docs" / "img" / "lora_forgetting.png"
TARGETS = ["c_attn", "c_proj", "c_fc"]


def methods(ranks: list[int]) -> dict[str, dict]:
    out = {"full": {"name": "finetune"}}
    for r in ranks:
        out[f"lora_r{r}"] = {"name": "lora", "params": {"r": r, "alpha": 2.0 * r, "target_modules": TARGETS,
                                                        "merge_after_task": False}}
    return out


def experiment(model: str, block: int, train_blocks: int, eval_blocks: int, batch: int, steps: int) -> dict:
    task = {"kind": "causal_lm", "block_size": block, "max_eval_blocks": eval_blocks}
    return {"name": "lora-forgetting", "source": {**task, "dataset": "prose", "name": "prose"},
            "targets": [{**task, "dataset": "python_code", "name": "code", "max_train_blocks": train_blocks}],
            "backbone": {"name": f"hf:{Path(model).resolve()}"},
            "train": {"epochs": 1, "lr": 1e-3, "batch_size": batch, "optimizer": "adamw"},
            "strategies": ["finetune"], "seed": 0, "pretrain": {"epochs": 1, "checkpoint_every": 1}}


def run_one(cfg_dict: dict, method: dict, lr: float, seed: int, steps: int, eval_every: int, tasks_file: str) -> dict:
    """One fine-tuning run: (step, prose val loss, code val loss) every `eval_every` steps."""
    from forgetless.config import load_config
    from forgetless.platform.worker.engine import make_optimizer
    from forgetless.platform.worker.lm_pretrain import warmup_cosine
    from forgetless.platform.worker.model_io import build_model
    from forgetless.platform.worker.evaluation import evaluate
    from forgetless.strategies import make_strategy
    from forgetless.strategies.base import task_infos
    from forgetless.strategies.training import TorchEngine, lr_scheduler, set_train_mode, set_trainable, train_step

    torch.set_num_threads(1)
    cfg = load_config({**cfg_dict, "seed": seed})
    tasks = load_tasks(tasks_file)
    infos = task_infos(tasks)
    strategy = make_strategy(method["name"], {**method.get("params", {}), **(
        {"seed": seed} if method["name"] == "lora" else {})}, 1, lr)
    torch.manual_seed(seed)
    model = build_model(cfg, infos, strategy)
    phase = strategy.phases(model, infos[1])[0]
    phase.lr_multipliers = lambda s: warmup_cosine(steps, max(1, steps // 10))(s) * len(phase.param_groups)
    set_trainable(model, phase)
    opt = make_optimizer(phase, cfg.train, use_gpu=False)
    engine, gen = TorchEngine(model, opt, lr_scheduler(opt, phase)), torch.Generator().manual_seed(seed)
    curve, start = [], time.time()
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            res = evaluate(model, tasks, "val", 1, False, 0, 1, torch.device("cpu"), batch_size=32)
            curve.append({"step": step, "source_loss": res[0][1], "target_loss": res[1][1],
                          "source_acc": res[0][0], "target_acc": res[1][0]})
        if step == steps:
            break
        set_train_mode(model, phase)
        b = torch.randint(0, len(tasks[1].x_train), (cfg.train.batch_size,), generator=gen)
        train_step(engine, model, strategy, phase, infos[1], tasks[1].x_train[b], tasks[1].y_train[b], gen)
    trainable = sum(p.numel() for p in phase.trainable())
    return {"curve": curve, "trainable": trainable, "seconds": time.time() - start}


def tune_runs(cfg: dict, grid: list[dict], args, tasks_file: str) -> list[dict]:
    """Every (method, lr, seed) of `grid` as a Ray Tune trial (grid search, 2 at a time, 1 CPU each)."""
    import ray
    from ray import tune

    def trial(point):
        config = grid[point["point"]]
        out = run_one(cfg, config["method"], config["lr"], config["seed"], args.steps, args.eval_every, tasks_file)
        final = out["curve"][-1]
        tune.report({"target_loss": final["target_loss"], "source_loss": final["source_loss"],
                     "result": json.dumps(out)})

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # one grid axis of indices: Tune's grid is a product, the runs wanted are a list
        tuner = tune.Tuner(tune.with_resources(trial, {"cpu": 1}),
                           param_space={"point": tune.grid_search(list(range(len(grid))))},
                           tune_config=tune.TuneConfig(max_concurrent_trials=2),
                           run_config=tune.RunConfig(storage_path=str(Path(tasks_file).parent / "tune"),
                                                     name=f"lora_forgetting_{time.time_ns()}", verbose=0))
        results = tuner.fit()
        out = [None] * len(grid)
        for r in results:
            if r.error:
                raise RuntimeError(f"trial {r.config} failed: {r.error}")
            out[r.config["point"]] = {**grid[r.config["point"]], **json.loads(r.metrics["result"])}
        return out
    finally:
        ray.shutdown()


def save_tasks(tasks, path: str) -> None:
    """The built tasks as plain tensors and values (read back with weights_only=True): built once, not per trial."""
    from dataclasses import asdict

    torch.save([{**asdict(t), "input_shape": list(t.input_shape)} for t in tasks], path)


def load_tasks(path: str):
    from forgetless.data.tasks import TaskData

    return [TaskData(**{**d, "input_shape": tuple(d["input_shape"])}) for d in torch.load(path, weights_only=True)]


# ---------------------------------------------------------------------------------------------------------------------
# what the runs say


def mean_curve(runs: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean target loss, mean source loss) over seeds."""
    steps = np.array([p["step"] for p in runs[0]["curve"]])
    tgt = np.mean([[p["target_loss"] for p in r["curve"]] for r in runs], axis=0)
    src = np.mean([[p["source_loss"] for p in r["curve"]] for r in runs], axis=0)
    return steps, tgt, src


def full_frontier(points: list[tuple[float, float]], target_loss: float) -> float | None:
    """The lowest source loss any full fine-tuning point (any lr, any step) has at a target loss at least as good as
    `target_loss`; None if full fine-tuning never got there."""
    ok = [s for t, s in points if t <= target_loss]
    return min(ok) if ok else None


def summarize(runs: list[dict], methods_: list[str], search: list[dict] | None = None) -> dict:
    """Per method: final target/source loss (mean, std over seeds), forgetting = source loss increase, the gap to
    full fine-tuning's curve at the same target loss (interpolated along its mean curve at its chosen lr), and the gap
    to full fine-tuning's frontier (every point of every full fine-tuning run, all learning rates searched)."""
    out = {}
    frontier = [(p["target_loss"], p["source_loss"]) for r in [*runs, *(search or [])] if r["label"] == "full"
                for p in r.get("curve", [])]
    full = [r for r in runs if r["label"] == "full"]
    _, ft_tgt, ft_src = mean_curve(full)
    order = np.argsort(ft_tgt)
    for m in methods_:
        rs = [r for r in runs if r["label"] == m]
        tgt = [r["curve"][-1]["target_loss"] for r in rs]
        src = [r["curve"][-1]["source_loss"] for r in rs]
        forg = [r["curve"][-1]["source_loss"] - r["curve"][0]["source_loss"] for r in rs]
        on_ft = float(np.interp(np.mean(tgt), ft_tgt[order], ft_src[order]))
        out[m] = {"lr": rs[0]["lr"], "seeds": [r["seed"] for r in rs], "trainable": rs[0]["trainable"],
                  "target_loss": stats(tgt), "source_loss": stats(src), "source_loss_increase": stats(forg),
                  "target_perplexity": stats([float(np.exp(v)) for v in tgt]),
                  "source_perplexity": stats([float(np.exp(v)) for v in src]),
                  "gap_to_full_curve": float(np.mean(src) - on_ft),
                  "gap_to_full_frontier": (None if full_frontier(frontier, float(np.mean(tgt))) is None else
                                           float(np.mean(src) - full_frontier(frontier, float(np.mean(tgt))))),
                  "full_curve_reaches_target_loss": bool(ft_tgt.min() <= np.mean(tgt) <= ft_tgt.max())}
    return out


def stats(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "values": [float(v) for v in values]}


def verdict(summary: dict) -> dict:
    """The three claims, each judged against the spread over seeds (2 standard deviations)."""
    full = summary["full"]
    out = {}
    for m, s in summary.items():
        if m == "full":
            continue
        noise_t = 2 * max(s["target_loss"]["std"], full["target_loss"]["std"], 1e-3)
        noise_f = 2 * max(s["source_loss_increase"]["std"], full["source_loss_increase"]["std"], 1e-3)
        out[m] = {
            "learns_less": s["target_loss"]["mean"] > full["target_loss"]["mean"] + noise_t,
            "forgets_less": s["source_loss_increase"]["mean"] < full["source_loss_increase"]["mean"] - noise_f,
            "on_full_finetuning_curve": s["full_curve_reaches_target_loss"] and abs(s["gap_to_full_curve"]) <= noise_f,
            "full_finetuning_does_better_at_equal_learning": (s["gap_to_full_frontier"] is not None
                                                              and s["gap_to_full_frontier"] > noise_f),
        }
    return out


def plot(runs: list[dict], methods_: list[str], path: Path, search: list[dict] | None = None) -> None:
    """The learning-forgetting curve: source (prose) loss against target (code) loss over training, one line per method
    (mean over seeds; the step-0 point is the pre-trained model, shared by all), each seed's final point as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    chosen = {(r["label"], r["lr"]) for r in runs}
    for r in search or []:  # the other learning rates of full fine-tuning (seed 0): its frontier
        if r["label"] == "full" and (r["label"], r["lr"]) not in chosen and r.get("curve"):
            ax.plot([p["target_loss"] for p in r["curve"]], [p["source_loss"] for p in r["curve"]], ":", color="C0",
                    alpha=0.6, lw=1)
            ax.annotate(f"full lr {r['lr']:g}", (r["curve"][-1]["target_loss"], r["curve"][-1]["source_loss"]),
                        fontsize=7, color="C0")
    for i, m in enumerate(methods_):
        rs = [r for r in runs if r["label"] == m]
        _, tgt, src = mean_curve(rs)
        color = f"C{i}"
        ax.plot(tgt, src, "-o", ms=3, color=color, label=f"{m} (lr {rs[0]['lr']:g})")
        ax.scatter([r["curve"][-1]["target_loss"] for r in rs], [r["curve"][-1]["source_loss"] for r in rs],
                   color=color, marker="x", s=40)
    ax.set_xlabel("target: code validation loss (nats/token, lower = learned more)")
    ax.set_ylabel("source: prose validation loss (higher = forgot more)")
    ax.invert_xaxis()
    ax.set_title("Learning vs forgetting (line: mean over seeds; x: each seed's end)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(summary: dict, verdicts: dict) -> str:
    lines = ["| method | lr | trainable | code loss | prose loss | prose loss increase | code ppl | prose ppl | "
             "learns less | forgets less | on full-FT curve | full FT better at equal learning |", "|" + " --- |" * 12]
    for m, s in summary.items():
        v = verdicts.get(m, {})
        f = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f}"  # noqa: E731
        g = lambda d: f"{d['mean']:.1f} ± {d['std']:.1f}"  # noqa: E731
        yn = lambda k: "-" if not v else ("yes" if v[k] else "no")  # noqa: E731
        lines.append(f"| {m} | {s['lr']:g} | {s['trainable']:,} | {f(s['target_loss'])} | {f(s['source_loss'])} | "
                     f"{f(s['source_loss_increase'])} | {g(s['target_perplexity'])} | {g(s['source_perplexity'])} | "
                     f"{yn('learns_less')} | {yn('forgets_less')} | {yn('on_full_finetuning_curve')} | "
                     f"{yn('full_finetuning_does_better_at_equal_learning')} |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/prose-gpt2", help="pre-trained decoder folder (lm_pretrain builds it)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--train-blocks", type=int, default=2000, help="cap on code training blocks")
    ap.add_argument("--eval-blocks", type=int, default=32, help="validation blocks per corpus")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--full-lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    ap.add_argument("--lora-lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--plot", default=str(PLOT))
    ap.add_argument("--analyze", metavar="JSON", help="only recompute summary, verdict, table and plot of a results file")
    return ap.parse_args(argv)


def analyze(report: dict, out: str, plot_path: str) -> dict:
    """Summary, verdict, plot and table from the runs (and the lr search's curves) of a report; writes it back."""
    labels = list(dict.fromkeys(r["label"] for r in report["runs"]))
    report["summary"] = summarize(report["runs"], labels, report.get("lr_search"))
    report["verdict"] = verdict(report["summary"])
    plot(report["runs"], labels, Path(plot_path), report.get("lr_search"))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1, default=str))
    print(table(report["summary"], report["verdict"]))
    return report


def main(argv=None) -> None:
    from forgetless.config import load_config
    from forgetless.data import build_stream

    args = parse_args(argv)
    if args.analyze:
        analyze(json.loads(Path(args.analyze).read_text()), args.out, args.plot)
        return
    if not Path(args.model, "config.json").exists():
        from forgetless.platform.worker.lm_pretrain import pretrain

        pretrain(args.model)
    cfg = experiment(args.model, args.block_size, args.train_blocks, args.eval_blocks, args.batch_size, args.steps)
    loaded = load_config(cfg)
    tmp = tempfile.mkdtemp(prefix="lora_forgetting_")
    tasks_file = str(Path(tmp, "tasks.pt"))
    save_tasks(build_stream(loaded.source, loaded.targets), tasks_file)
    ms = methods(args.ranks)
    lrs = {m: args.full_lrs if m == "full" else args.lora_lrs for m in ms}
    start = time.time()
    search = [{"label": m, "method": ms[m], "lr": lr, "seed": args.seeds[0]} for m in ms for lr in lrs[m]]
    searched = tune_runs(cfg, search, args, tasks_file)
    best = {m: min((r for r in searched if r["label"] == m), key=lambda r: r["curve"][-1]["target_loss"])
            for m in ms}
    rest = [{"label": m, "method": ms[m], "lr": best[m]["lr"], "seed": s} for m in ms for s in args.seeds[1:]]
    runs = list(best.values()) + (tune_runs(cfg, rest, args, tasks_file) if rest else [])
    report = {"protocol": {k: v for k, v in vars(args).items()}, "experiment": cfg,
              "pretraining": json.loads(Path(args.model, "pretraining.json").read_text())
              if Path(args.model, "pretraining.json").exists() else None,
              "lr_search": [{"label": r["label"], "lr": r["lr"], "seed": r["seed"], "curve": r["curve"]}
                            for r in searched],
              "runs": runs, "wall_seconds": time.time() - start}
    analyze(report, args.out, args.plot)
    print(f"wrote {args.out} and {args.plot} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
