"""Ray Train's own floor on this machine: `TorchTrainer.fit()` of a train function that does nothing, on the embedded
cluster forgetless starts, interleaved A B C A B C in one cluster:

- `ray_default`: Ray's TorchTrainer as it comes;
- `lean_ray_torchconfig`: forgetless's LeanTorchTrainer (no DatasetManager, no PlacementGroupCleaner process: the
  driver cleans up) but with Ray's TorchConfig, which makes the Train controller import torch;
- `lean`: LeanTorchTrainer as forgetless fits with it (its controller imports no torch: platform/driver/train_controller.py, _compat/ray_train.py).

    python benchmarks/train_floor.py --pairs 3         # writes benchmarks/results/train_floor.json

Per fit: `start` = fit() called → the train function entered on world rank 0 (the Train controller, the placement
group, the worker processes and their imports, torch.distributed); `total` = the whole fit(). Nothing of forgetless runs
inside the workers, so this is what every strategy run pays before its own work starts. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ray import cloudpickle
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from forgetless.platform.driver import trainer as lean_trainer
from forgetless.platform.driver.ray_cluster import init_ray

ROOT = Path(__file__).resolve().parents[1]


def _enter(config):
    import ray.train
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["entered_file"]).write_text(str(time.time()))


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this script


def one_fit(side: str, workers: int, folder: str, index: int) -> dict[str, float]:
    entered_file = str(Path(folder, f"entered-{side}-{index}"))
    kwargs = dict(train_loop_config={"entered_file": entered_file}, scaling_config=ScalingConfig(num_workers=workers),
                  run_config=RunConfig(name=f"floor-{side}-{index}", storage_path=folder))
    t0 = time.time()
    if side == "ray_default":
        TorchTrainer(_enter, **kwargs).fit()
    elif side == "lean_ray_torchconfig":
        lean_trainer.fit(_enter, embedded_cluster=True, torch_config=TorchConfig(), **kwargs)
    else:
        lean_trainer.fit(_enter, embedded_cluster=True, **kwargs)  # as fits.fit on an embedded cluster
    return {"start": float(Path(entered_file).read_text()) - t0, "total": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/train_floor.json"))
    args = ap.parse_args()
    init_ray(None, use_gpu=False)
    sides = ("ray_default", "lean_ray_torchconfig", "lean")
    runs = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as folder:
        one_fit("ray_default", args.workers, folder, -1)  # warm-up: the first fit of a cluster starts helper actors
        for i in range(args.pairs):
            for side in sides:
                runs[side].append(one_fit(side, args.workers, folder, i))
                print(f"pair {i + 1} {side}: start {runs[side][-1]['start']:.1f} s, "
                      f"total {runs[side][-1]['total']:.1f} s", flush=True)
    summary = {side: {part: {"min": min(r[part] for r in runs[side]),
                             "median": statistics.median(r[part] for r in runs[side])} for part in ("start", "total")}
               for side in sides}
    for base in ("ray_default", "lean_ray_torchconfig"):
        ratios = [b["total"] / a["total"] for a, b in zip(runs[base], runs["lean"])]
        summary[f"total ratio lean / {base}"] = {"min": min(ratios), "median": statistics.median(ratios)}
    Path(args.out).write_text(json.dumps({"workers": args.workers, "runs": runs, "summary": summary}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
