"""Reproduce EXPANSE's claims through the platform (Ray Train + DeepSpeed, MLflow), several seeds.

Runs `forgetless.compare` on examples/expanse_digits_to_mnist1d.yaml (digits -> MNIST-1D resampled to 64: a distant
target) once per seed: linear_probe, finetune, two-step EXPANSE and one-step EXPANSE from one pre-trained backbone per
seed. Reports source test accuracy before / after (EXPANSE must be exactly equal), target test accuracy, and the number
of trainable parameters; every run is in MLflow (./mlflow.db) with its R heatmap and curves.

    python benchmarks/repro_expanse.py --seeds 0 1 2 [--config examples/expanse_digits_to_mnist1d.yaml] [--set k=v ...]
    python benchmarks/repro_expanse.py --local --seeds 0 1 2 3 4     (one process, no Ray/DeepSpeed: the same strategy
                                                                      code and phases in a plain torch loop, fast)

Writes benchmarks/results/expanse_<config name>.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import forgetless


def mean_std(values, pct=True):
    values = [100 * v if pct else v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def local_compare(cfg):
    """One process: the platform's recipe (pre-training, then each strategy's build / phases / augment / frozen
    modules) in a plain torch loop with the global batch of the Ray run (batch_size x workers). Returns
    {label: (R, trainable parameters)}."""
    import torch

    from forgetless.data import build_stream
    from forgetless.data.sharding import derive_seed
    from forgetless.platform.worker.engine import make_optimizer
    from forgetless.platform.worker.model_io import build_model, load_pretrained
    from forgetless.strategies import make_strategy
    from forgetless.strategies.base import task_infos
    from forgetless.strategies.training import TorchEngine, set_train_mode, set_trainable, train_step

    tasks = build_stream(cfg.source, cfg.targets)
    infos = task_infos(tasks)
    world = cfg.scaling.num_workers

    @torch.no_grad()
    def acc(model, j):
        model.eval()
        x, y = tasks[j].split("test")
        return float((model(x, j).argmax(1) == y).float().mean())

    def train(model, strategy, phase, stage, optim, p_idx):
        """The platform's train_step with a torch optimizer, on the global batch of the Ray run."""
        set_trainable(model, phase)
        engine = TorchEngine(model, make_optimizer(phase, optim))
        task, bs = tasks[stage], optim.batch_size * world
        for epoch in range(phase.epochs):
            set_train_mode(model, phase)
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, stage, p_idx, epoch))
            order = torch.randperm(len(task.x_train), generator=g)
            for i in range(0, len(order) - bs + 1, bs):
                b = order[i: i + bs]
                train_step(engine, model, strategy, phase, infos[stage], task.x_train[b], task.y_train[b], g)

    pretraining = make_strategy("source_pretrain", {}, cfg.pretrain.epochs, cfg.pretrain.lr)
    source_model = build_model(cfg, infos[:1], pretraining)
    train(source_model, pretraining, pretraining.phases(source_model, infos[0])[0], 0, cfg.pretrain, 0)
    pretrained = source_model.state_dict()
    out = {}
    for s in cfg.strategies:
        strategy = make_strategy(s.name, s.params, cfg.train.epochs, cfg.train.lr)
        model = build_model(cfg, infos, strategy)
        load_pretrained(model, pretrained)
        R = [[acc(model, 0), acc(model, 1)]]
        trainable = 0
        for p_idx, phase in enumerate(strategy.phases(model, infos[1])):
            trainable = max(trainable, sum(p.numel() for p in phase.trainable()))
            train(model, strategy, phase, 1, cfg.train, p_idx)
        R.append([acc(model, 0), acc(model, 1)])
        out[s.display_name()] = (R, trainable)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).parents[1] / "examples/expanse_digits_to_mnist1d.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--local", action="store_true", help="one process, no Ray / DeepSpeed / MLflow")
    args = ap.parse_args()
    if args.local:
        import torch

        torch.set_num_threads(1)
        runs = []
        for seed in args.seeds:
            cfg = forgetless.load_config(args.config, overrides=[f"seed={seed}", *args.overrides])
            for label, (R, trainable) in local_compare(cfg).items():
                runs.append({"seed": seed, "label": label, "source_before": R[0][0], "source_after": R[1][0],
                             "target": R[1][1], "trainable": trainable, "source_exact": R[1][0] == R[0][0]})
                print(seed, label, R, flush=True)
        report(args, runs, suffix="_local")
        return
    from forgetless.platform.driver.ray_cluster import init_ray

    init_ray(None, use_gpu=False)  # one embedded cluster for every seed, as the CLI would start; compare() reuses it
    runs = []
    res = forgetless.compare(args.config, overrides=list(args.overrides), seeds=args.seeds)  # mean ± sd table
    print(res.table(), flush=True)
    for r in res.results:
        R = r.accuracy_matrix
        runs.append({"seed": r.seed, "label": r.label, "source_before": float(R[0][0]),
                     "source_after": float(R[1][0]),
                     "target": float(R[1][1]), "trainable": r.metrics["trainable_params/max"],
                     "steps_to_90": r.metrics["steps_to/90"], "wall_seconds": r.wall_seconds,
                     "mlflow_run_id": r.mlflow_run_id, "source_exact": bool(R[1][0] == R[0][0])})
    report(args, runs)


def report(args, runs, suffix=""):
    name = forgetless.load_config(args.config).name
    out = Path(__file__).parent / "results" / f"expanse_{name}{suffix}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "runs": runs}, indent=1))
    labels = list(dict.fromkeys(r["label"] for r in runs))
    print(f"\n{name}: test accuracy %, mean ± std over seeds {args.seeds}\n")
    print("| strategy | target acc | source before | source after | source exactly equal | trainable params |")
    print("|---|---|---|---|---|---|")
    for label in labels:
        rs = [r for r in runs if r["label"] == label]
        print(f"| {label} | {mean_std([r['target'] for r in rs])} | {mean_std([r['source_before'] for r in rs])} | "
              f"{mean_std([r['source_after'] for r in rs])} | {sum(r['source_exact'] for r in rs)}/{len(rs)} | "
              f"{int(rs[0]['trainable'])} |")


if __name__ == "__main__":
    main()
