"""Small-scale reproduction of "LoRA Learns Less and Forgets Less" (Biderman et al., 2024, TMLR), under the protocol.

Their claim: fine-tuning a pre-trained LM on a new domain (code) with LoRA reaches a worse target loss than full
fine-tuning (learns less) and keeps more of the source-domain ability (forgets less); plotted as source vs target loss
over training, LoRA sits at the less-learned, less-forgotten end of the trade-off.

Here: a GPT-2-style decoder pre-trained from scratch on the built-in English `prose` corpus
(`python -m forgetless.platform.worker.lm_pretrain --out models/prose-gpt2 --steps 400`: 4.24 M parameters, width
256), fine-tuned on the built-in `python_code` corpus under
- `full`: full fine-tuning, and two controls: `full_frozen_emb` (the token and position embeddings frozen, as LoRA
  keeps them) and `full_wd` (AdamW weight decay 0.1);
- `lora_r<r>` for ranks below the model width (default 8 and 64; alpha = 2r, every linear layer: c_attn, c_proj, c_fc),
the same number of optimizer steps for all. The protocol (docs/protocol.md):
1. **Select on validation**: each method's learning rate is the one with the lowest final code *validation* loss on a
   selection seed of its own (`--select-seed`, not one of the reported seeds); a best rate at the edge of its grid
   widens the grid (x3 beyond the edge) and runs again, up to `--max-widen` times per side (a rate still at the edge
   after that is flagged in the JSON and the docs).
2. **Report on test**: every reported seed runs at its method's selected rate; the reported numbers are the final code
   and prose *test* losses (nats per token), forgetting = the prose test loss increase from the pre-trained model.
3. **Paired statistics** (benchmarks/verdicts.py, from this file's JSON): each method's difference from `full` per
   seed (same seed = same data order and initialisation of the new parts), mean ± sd, n, a paired t-test and a
   bootstrap 95% interval.
4. **Fronts**: every (learning rate, evaluation step) point of the selection runs, on the test split, pooled per
   method into a Pareto front of (code loss, prose loss); each front's hypervolume against one reference point.

The training is the platform's own: the config path (`load_config`, task kind causal_lm), `build_model`, the strategies'
phases and `train_step` with a torch optimizer (`TorchEngine`), in one process per trial (no DeepSpeed: the same
update, measured without the platform's fixed costs on a 2-core machine). Trials run as a Ray Tune grid.

    python benchmarks/lora_forgetting.py --model models/prose-gpt2 --steps 100 --seeds 0 1 2

Writes benchmarks/results/lora_forgetting_protocol.json and docs/img/lora_forgetting_protocol.png (or --out /
--plot); `python benchmarks/verdicts.py` turns the JSON into the verdict table of docs/language_models.md.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results" / "lora_forgetting_protocol.json"
PLOT = Path(__file__).parent.parent / "docs" / "img" / "lora_forgetting_protocol.png"
TARGETS = ["c_attn", "c_proj", "c_fc"]
EMBEDDINGS = ["*wte*", "*wpe*"]


def methods(ranks: list[int]) -> dict[str, dict]:
    """label -> {strategy name, params, train overrides}."""
    out = {"full": {"name": "finetune"},
           "full_frozen_emb": {"name": "finetune", "params": {"frozen": EMBEDDINGS}},
           "full_wd": {"name": "finetune", "train": {"weight_decay": 0.1}}}
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


def evaluate_point(model, tasks, step: int) -> dict:
    """Losses (nats per token) and next-token accuracies of both corpora on the validation and the test split."""
    from forgetless.platform.worker.evaluation import evaluate

    point = {"step": step}
    for split in ("val", "test"):
        res = evaluate(model, tasks, split, 1, False, 0, 1, torch.device("cpu"), batch_size=32)
        point.update({f"{split}_source_loss": res[0][1], f"{split}_target_loss": res[1][1],
                      f"{split}_source_acc": res[0][0], f"{split}_target_acc": res[1][0]})
    return point


def run_one(cfg_dict: dict, method: dict, lr: float, seed: int, steps: int, eval_every: int, tasks_file: str) -> dict:
    """One fine-tuning run: the losses of both corpora on both splits every `eval_every` steps."""
    from forgetless.config import load_config
    from forgetless.platform.worker.engine import make_optimizer
    from forgetless.platform.worker.lm_pretrain import warmup_cosine
    from forgetless.platform.worker.model_io import build_model
    from forgetless.strategies import make_strategy
    from forgetless.strategies.base import task_infos
    from forgetless.strategies.training import TorchEngine, lr_scheduler, set_train_mode, set_trainable, train_step

    torch.set_num_threads(1)
    train = {**cfg_dict["train"], **method.get("train", {})}
    cfg = load_config({**cfg_dict, "seed": seed, "train": train})
    tasks = load_tasks(tasks_file)
    infos = task_infos(tasks)
    strategy = make_strategy(method["name"], {**method.get("params", {}), **(
        {"seed": seed} if method["name"] == "lora" else {})}, 1, lr)
    torch.manual_seed(seed)
    model = build_model(cfg, infos, strategy)
    phase = strategy.phases(model, infos[1])[0]
    phase.lr_multipliers = lambda s: warmup_cosine(steps, max(1, steps // 10))(s) * len(phase.param_groups)
    set_trainable(model, phase)
    opt = make_optimizer(phase, cfg.train)
    engine, gen = TorchEngine(model, opt, lr_scheduler(opt, phase)), torch.Generator().manual_seed(seed)
    curve, start = [], time.time()
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            curve.append(evaluate_point(model, tasks, step))
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
        end = out["curve"][-1]
        tune.report({"val_target_loss": end["val_target_loss"], "val_source_loss": end["val_source_loss"],
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
# selection on validation, with the grid widened past an edge optimum


def final(run: dict, key: str) -> float:
    return run["curve"][-1][key]


def widen(lrs: list[float], best: float) -> float | None:
    """The next rate beyond the grid's edge where its best sits (x3 / 3), None when the best is inside."""
    ordered = sorted(lrs)
    if best == ordered[-1]:
        return best * 3
    if best == ordered[0]:
        return best / 3
    return None


def select_rates(cfg: dict, ms: dict, grids: dict[str, list[float]], args, tasks_file: str) -> tuple[list, dict]:
    """Run every (method, lr) on the selection seed, widening each grid whose best validation loss is at an edge;
    returns (all selection runs, {method: {"lr", "at_edge", "grid"}})."""
    runs: list[dict] = []
    pending = [{"label": m, "method": ms[m], "lr": lr, "seed": args.select_seed} for m in ms for lr in grids[m]]
    widenings = {m: 0 for m in ms}
    while pending:
        runs += tune_runs(cfg, pending, args, tasks_file)
        pending = []
        for m in ms:
            best = min((r for r in runs if r["label"] == m), key=lambda r: final(r, "val_target_loss"))
            nxt = widen(grids[m], best["lr"])
            if nxt is not None and widenings[m] < args.max_widen:
                widenings[m] += 1
                grids[m].append(nxt)
                pending.append({"label": m, "method": ms[m], "lr": nxt, "seed": args.select_seed})
    chosen = {}
    for m in ms:
        best = min((r for r in runs if r["label"] == m), key=lambda r: final(r, "val_target_loss"))
        chosen[m] = {"lr": best["lr"], "grid": sorted(grids[m]), "at_edge": widen(grids[m], best["lr"]) is not None}
    return runs, chosen


# ---------------------------------------------------------------------------------------------------------------------
# what the runs say (test split)


def forgetting(run: dict, split: str = "test") -> float:
    """The prose loss increase from the pre-trained model (step 0) to the end, in nats per token."""
    return final(run, f"{split}_source_loss") - run["curve"][0][f"{split}_source_loss"]


def stats(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "values": [float(v) for v in values]}


def summarize(runs: list[dict], chosen: dict) -> dict:
    """Per method, on the reported seeds at its selected rate: final code and prose test losses, forgetting."""
    out = {}
    for m, c in chosen.items():
        rs = sorted((r for r in runs if r["label"] == m), key=lambda r: r["seed"])
        out[m] = {"lr": c["lr"], "grid": c["grid"], "lr_at_grid_edge": c["at_edge"], "trainable": rs[0]["trainable"],
                  "seeds": [r["seed"] for r in rs], "target_loss": stats([final(r, "test_target_loss") for r in rs]),
                  "source_loss": stats([final(r, "test_source_loss") for r in rs]),
                  "source_loss_increase": stats([forgetting(r) for r in rs])}
    return out


def fronts(selection: list[dict]) -> dict:
    """Per method: every (lr, step) point of its selection runs on the test split, the Pareto front of (code loss,
    prose loss), both minimised, and the front's hypervolume against one reference point shared by all methods."""
    from forgetless.platform.analysis.pareto import MIN, hypervolume_2d, pareto_front

    objectives = [("target", MIN), ("source", MIN)]
    points = {m: [{"lr": r["lr"], "step": p["step"], "target": p["test_target_loss"], "source": p["test_source_loss"]}
                  for r in selection if r["label"] == m for p in r["curve"][1:]]
              for m in dict.fromkeys(r["label"] for r in selection)}
    every = [p for ps in points.values() for p in ps]
    reference = {"target": max(p["target"] for p in every), "source": max(p["source"] for p in every)}
    out = {}
    for m, ps in points.items():
        front = [ps[i] for i in pareto_front(ps, objectives)]
        out[m] = {"points": ps, "front": front, "hypervolume": hypervolume_2d(ps, objectives, reference)}
    for m, f in out.items():  # how much of this front lies beyond full fine-tuning's (no full point dominates it)
        full_front = out["full"]["front"]
        f["beyond_full_front"] = sum(not any(q["target"] <= p["target"] and q["source"] <= p["source"] and q != p
                                             for q in full_front) for p in f["front"])
    return {"reference": reference, "methods": out}


def plot(fr: dict, summary: dict, path: Path) -> None:
    """Every (lr, step) point of the selection runs, per method, with its front drawn (test split)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (m, f) in enumerate(fr["methods"].items()):
        color = f"C{i}"
        ax.scatter([p["target"] for p in f["points"]], [p["source"] for p in f["points"]], s=10, alpha=0.35,
                   color=color)
        front = sorted(f["front"], key=lambda p: p["target"])
        ax.plot([p["target"] for p in front], [p["source"] for p in front], "-o", ms=4, color=color,
                label=f"{m} (selected lr {summary[m]['lr']:g})")
    ax.set_xlabel("code test loss (nats/token; lower = learned more)")
    ax.set_ylabel("prose test loss (higher = forgot more)")
    ax.invert_xaxis()
    ax.set_title("Every (lr, step) point of the selection runs and each method's front", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/prose-gpt2", help="pre-trained decoder folder (lm_pretrain builds it)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--train-blocks", type=int, default=2000, help="cap on code training blocks")
    ap.add_argument("--eval-blocks", type=int, default=24, help="validation and test blocks per corpus")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the reported seeds")
    ap.add_argument("--select-seed", type=int, default=100, help="the seed of the learning-rate selection runs")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 64], help="LoRA ranks (below the model width)")
    ap.add_argument("--full-lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    ap.add_argument("--lora-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--max-widen", type=int, default=2, help="grid widenings per method past an edge optimum")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--plot", default=str(PLOT))
    ap.add_argument("--analyze", metavar="JSON", help="only recompute the analysis and plot of a results file")
    return ap.parse_args(argv)


def analyze(report: dict, out: str, plot_path: str) -> dict:
    """Summary (test), paired differences, verdicts, fronts and plot from a report's runs; writes it back."""
    report["summary"] = summarize(report["runs"], report["selected"])
    report["fronts"] = fronts(report["selection_runs"])
    plot(report["fronts"], report["summary"], Path(plot_path))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({m: {k: s[k] for k in ("lr", "lr_at_grid_edge", "target_loss", "source_loss_increase")}
                      for m, s in report["summary"].items()}, indent=1))
    return report


def main(argv=None) -> None:
    from forgetless.config import load_config
    from forgetless.data import build_stream

    args = parse_args(argv)
    if args.analyze:
        analyze(json.loads(Path(args.analyze).read_text()), args.out, args.plot)
        return
    if not Path(args.model, "config.json").exists():
        raise SystemExit(f"{args.model} is not a model folder; build it with: python -m "
                         f"forgetless.platform.worker.lm_pretrain --out {args.model} --steps 400")
    cfg = experiment(args.model, args.block_size, args.train_blocks, args.eval_blocks, args.batch_size, args.steps)
    loaded = load_config(cfg)
    tasks_file = str(Path(tempfile.mkdtemp(prefix="lora_forgetting_"), "tasks.pt"))
    save_tasks(build_stream(loaded.source, loaded.targets), tasks_file)
    ms = methods(args.ranks)
    grids = {m: list(args.full_lrs if m.startswith("full") else args.lora_lrs) for m in ms}
    start = time.time()
    selection, chosen = select_rates(cfg, ms, grids, args, tasks_file)
    reported = [{"label": m, "method": ms[m], "lr": chosen[m]["lr"], "seed": s} for m in ms for s in args.seeds]
    runs = tune_runs(cfg, reported, args, tasks_file)
    report = {"protocol": dict(vars(args)), "experiment": cfg,
              "pretraining": json.loads(Path(args.model, "pretraining.json").read_text())
              if Path(args.model, "pretraining.json").exists() else None,
              "selected": chosen, "selection_runs": selection, "runs": runs, "wall_seconds": time.time() - start}
    analyze(report, args.out, args.plot)
    print(f"wrote {args.out} and {args.plot} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
