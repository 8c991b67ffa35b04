"""Reproduce learning transfer (GMT / FGMT, Chijiwa ICLR 2024) on real data, one process, several seeds.

For each seed: pre-train an MLP with SGD on the source (θ₁⁰ → θ₁ᵀ, as the paper's MNIST MLP), transfer the trajectory
to a new initialisation θ₂⁰ with naive / GMT / FGMT / oracle (the strategy's own `prepare`, through a one-process
context), record the source validation accuracy of θ₂ᵗ along t (no training), then train the source from the best
transferred point and from θ₂⁰ and count SGD steps until a target accuracy is reached. Also the wall-clock cost of the
transfer itself (gradients + matching, evaluation excluded) next to the pre-training's.

    python benchmarks/repro_trajectory.py --dataset digits --seeds 0 1 2
    python benchmarks/repro_trajectory.py --dataset mnist1d --seeds 0 1 2

Writes benchmarks/results/trajectory_<dataset>.json and prints markdown tables.

    python benchmarks/repro_trajectory.py --platform --seeds 0 1 2

runs the same algorithm through the platform instead: one `forgetless compare examples/trajectory_digits.yaml` per
seed (Ray Train workers, DeepSpeed, MLflow in ./mlflow.db), reads every run's `transfer/val_acc` curve and
`steps_to/*` back from MLflow, and writes benchmarks/results/trajectory_platform.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import forgetless
from forgetless.backbones import TransferModel, build_backbone
from forgetless.config import PretrainConfig, TaskConfig
from forgetless.data import build_task
from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.driver.ray_cluster import init_ray
from forgetless.strategies import make_strategy
from forgetless.strategies.trajectory_transfer import local_context

METHODS = ["naive", "fgmt", "gmt", "oracle"]


def make_model(task, hidden, seed, backbone="mlp"):
    """The paper's MLP (`hidden` widths), or the 1-D CNN of the MNIST-1D streams (`cnn1d`, channels `hidden`)."""
    torch.manual_seed(seed)
    params = {"hidden": hidden} if backbone == "mlp" else {"channels": hidden}
    return TransferModel(build_backbone(backbone, task.input_shape, params), [task.num_classes], seed=seed)


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return float((model(x, 0).argmax(1) == y).float().mean())


def sgd_train(model, task, pre, epochs=None, max_steps=None, target=None, eval_every=5, seed=0):
    """The pre-training recipe; returns (steps to reach `target` val acc or None, total steps)."""
    opt = torch.optim.SGD(model.parameters(), lr=pre.lr, momentum=pre.momentum)
    g = torch.Generator().manual_seed(seed)
    step = 0
    if target is not None and accuracy(model, task.x_val, task.y_val) >= target:
        return 0, 0
    for _ in range(epochs or 10**6):
        order = torch.randperm(len(task.x_train), generator=g)
        for i in range(0, len(order), pre.batch_size):
            b = order[i: i + pre.batch_size]
            model.train()
            opt.zero_grad()
            F.cross_entropy(model(task.x_train[b], 0), task.y_train[b]).backward()
            opt.step()
            step += 1
            if target is not None and step % eval_every == 0 and accuracy(model, task.x_val, task.y_val) >= target:
                return step, step
            if max_steps is not None and step >= max_steps:
                return None, step
    return None, step


def one_seed(task, pre, hidden, T, seed, backbone="mlp"):
    theta1 = make_model(task, hidden, seed, backbone)
    traj = [(0, copy.deepcopy(theta1.state_dict()))]
    t0 = time.perf_counter()
    sgd_train(theta1, task, pre, epochs=pre.epochs, seed=seed)
    pretrain_seconds = time.perf_counter() - t0
    traj.append((pre.epochs, copy.deepcopy(theta1.state_dict())))
    theta1_acc = accuracy(theta1, task.x_val, task.y_val)
    out = {"seed": seed, "theta1_T_val_acc": theta1_acc, "pretrain_seconds": pretrain_seconds, "methods": {}}
    target = 0.95 * theta1_acc
    best_models = {}
    for method in METHODS + ["none"]:
        ctx = local_context((task.x_train, task.y_train), (task.x_val, task.y_val), traj, pre, log=lambda s: None)
        strategy = make_strategy("trajectory_transfer", {"method": method, "steps": T, "batch_size": 128,
                                                         "theta2_seed": 1000 + seed, "seed": seed}, 1, pre.lr)
        model = copy.deepcopy(theta1)
        strategy.prepare(model, ctx)
        best_models[method] = model
        if method != "none":
            r = strategy.result
            # t is chosen on the validation split (the strategy keeps its best step); the test split reports it
            out["methods"][method] = {"val_acc": r.val_acc, "best_step": r.best_step, "seconds": r.seconds,
                                      "eval_seconds": r.eval_seconds, "gradients": r.gradients,
                                      "test_acc_at_best_step": accuracy(model, task.x_test, task.y_test)}
    out["theta2_0_val_acc"] = out["methods"]["gmt"]["val_acc"][0]
    # subsequent training on the source to 95% of θ₁ᵀ's validation accuracy
    out["steps_to_target"] = {"target_acc": target}
    for start in ("gmt", "fgmt", "naive", "none"):
        steps, _ = sgd_train(copy.deepcopy(best_models[start]), task, pre, max_steps=3000, target=target, seed=seed)
        out["steps_to_target"][start] = steps
    return out


def mean_std(values, digits=1):
    values = [v for v in values if v is not None and v == v]  # None / NaN: not measured (e.g. never reached)
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def tables(results, T):
    lines = ["| method | " + " | ".join(f"t={t}" for t in range(T + 1)) + " | best | transfer s |",
             "|---|" + "---|" * (T + 3)]
    for m in METHODS:
        cells = [mean_std([100 * r["methods"][m]["val_acc"][t] for r in results]) for t in range(T + 1)]
        best = mean_std([100 * max(r["methods"][m]["val_acc"][1:]) for r in results])
        sec = mean_std([r["methods"][m]["seconds"] for r in results])
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {best} | {sec} |")
    chance = 100.0 / len(set(results[0].get("classes", range(10))))
    lines.append("| chance | " + " | ".join(f"{chance:.1f}" for _ in range(T + 1)) + " | | |")
    lines.append("")
    lines.append(f"θ₁ᵀ val acc {mean_std([100 * r['theta1_T_val_acc'] for r in results])} %; pre-training "
                 f"{mean_std([r['pretrain_seconds'] for r in results])} s (one process)")
    lines.append("")
    lines.append("| start of subsequent training | SGD steps to 95% of θ₁ᵀ's val acc (per seed) | mean |")
    lines.append("|---|---|---|")
    for start in ("gmt", "fgmt", "naive", "none"):
        per = [r["steps_to_target"][start] for r in results]
        lines.append(f"| {'θ₂⁰ (no transfer)' if start == 'none' else start + ' (best t)'} | "
                     f"{', '.join('>3000' if v is None else str(v) for v in per)} | {mean_std(per)} |")
    return "\n".join(lines)


PLATFORM_LABELS = ["naive", "fgmt", "gmt", "oracle", "from_theta2_init"]


def platform(args) -> None:
    """One compare per seed through Ray Train + DeepSpeed; every number is read back from the MLflow runs."""
    init_ray(None, use_gpu=False)  # one embedded cluster for every seed, as the CLI would start
    runs = []
    cfg = forgetless.load_config(args.config)
    res = forgetless.compare(cfg, seeds=args.seeds)  # one parent run over every seed, mean ± sd table
    print(res.table(), flush=True)
    client = tracking.client(tracking.resolve_tracking_uri(cfg.tracking.tracking_uri))
    for r in res.results:
        history = sorted(client.get_metric_history(r.mlflow_run_id, "transfer/val_acc"), key=lambda m: m.step)
        m = client.get_run(r.mlflow_run_id).data.metrics
        runs.append({"seed": r.seed, "label": r.label, "val_acc": [h.value for h in history],
                     "transfer_seconds": m.get("transfer/seconds"), "gradients": m.get("transfer/gradients"),
                     "steps_to_90": m.get("steps_to/90"), "steps_to_95": m.get("steps_to/95"),
                     "target_acc": float(r.accuracy_matrix[1][1]), "source_after": float(r.accuracy_matrix[1][0]),
                     "wall_seconds": r.wall_seconds, "mlflow_run_id": r.mlflow_run_id})
    out = Path(__file__).parent / "results" / "trajectory_platform.json"
    out.write_text(json.dumps({"config": args.config, "seeds": args.seeds, "runs": runs}, indent=1))
    steps = max(len(r["val_acc"]) for r in runs) - 1
    print(f"\n{Path(args.config).name} through the platform, seeds {args.seeds} (mean ± std): source validation "
          f"accuracy % of θ₂ᵗ without training; then the target\n")
    head = " | ".join(f"t={t}" for t in range(steps + 1))
    print(f"| method | {head} | best t (installed) | transfer s | gradients | target: steps to 90% / 95% of best | "
          f"target acc % |")
    print("|---|" + "---|" * (steps + 6))
    for label in PLATFORM_LABELS:
        rs = [r for r in runs if r["label"] == label]
        if not rs:
            continue
        curve = " | ".join(pct([r["val_acc"][t] for r in rs if len(r["val_acc"]) > t]) for t in range(steps + 1))
        secs = [r["transfer_seconds"] for r in rs if r["transfer_seconds"] is not None]
        grads = rs[0]["gradients"]
        # a seed whose run never reached the threshold is left out of the mean and counted
        reach = " / ".join(mean_std([r[k] for r in rs]) + reached(rs, k) for k in ("steps_to_90", "steps_to_95"))
        best = pct([max(r["val_acc"][1:]) for r in rs if len(r["val_acc"]) > 1])
        print(f"| {label} | {curve} | {best} | {mean_std(secs, 2) if secs else ''} | {'' if grads is None else int(grads)} | "
              f"{reach} | {pct([r['target_acc'] for r in rs])} |")


def reached(rs, key) -> str:
    n = sum(r[key] is not None and r[key] == r[key] for r in rs)
    return "" if n == len(rs) else f" ({n}/{len(rs)} reached)"


def pct(values):
    return mean_std([100 * v for v in values]) if values else ""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits", choices=["digits", "mnist1d"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=5, help="T (paper: 5 for the MNIST MLP)")
    ap.add_argument("--epochs", type=int, default=10, help="pre-training epochs")
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 128],
                    help="the MLP's widths, or the cnn1d's channels")
    ap.add_argument("--backbone", default="mlp", choices=["mlp", "cnn1d"])
    ap.add_argument("--out", help="result file (default benchmarks/results/trajectory_<dataset>.json)")
    ap.add_argument("--platform", action="store_true",
                    help="run --config through Ray Train + DeepSpeed + MLflow instead of one process")
    ap.add_argument("--config", default=str(Path(__file__).parents[1] / "examples/trajectory_digits.yaml"),
                    help="the compare config of --platform")
    args = ap.parse_args()
    if args.platform:
        platform(args)
        return
    torch.set_num_threads(1)
    task = build_task(TaskConfig(dataset=args.dataset))
    pre = PretrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=64, epochs=args.epochs,
                         checkpoint_every=args.epochs)
    results = []
    for seed in args.seeds:
        r = one_seed(task, pre, args.hidden, args.steps, seed, args.backbone)
        r["classes"] = task.classes
        results.append(r)
        print(f"seed {seed}: " + ", ".join(f"{m} {[round(a, 3) for a in r['methods'][m]['val_acc']]}"
                                           for m in METHODS) + f"; steps {r['steps_to_target']}", flush=True)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"trajectory_{args.dataset}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results, "chance": 1 / task.num_classes,
                               "selection_split": "the validation split (t); the test split is reported"},
                              indent=1))
    print(f"\n{args.dataset}, MLP {args.hidden}, SGD {args.epochs} epochs, T={args.steps}, "
          f"{len(args.seeds)} seeds (mean ± std), source validation accuracy % of θ₂ᵗ without training:\n")
    print(tables(results, args.steps))


if __name__ == "__main__":
    main()
