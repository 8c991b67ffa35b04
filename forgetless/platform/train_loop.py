"""The Ray Train worker function: one plain loop for pre-training and for every strategy.

It knows nothing of strategy names: it asks the strategy for phases and extra loss terms, builds one DeepSpeed engine
per phase, shards data by rank, evaluates every task of the stream (sharded and all-reduced), and on every epoch has
every rank save its DeepSpeed shard and report, so that re-running the same run name resumes where it stopped.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

STATE_FILE = "state.json"
MODEL_FILE = "model.pt"
DS_TAG = "ds"
FINAL_CHECKPOINT = "final"  # the checkpoint of a finished run (its state.json has finished: 1)


# ---------------------------------------------------------------------------------------------------------------------
# model construction (also used by the driver to rebuild a model for export)


def build_model(cfg, tasks_meta: list[dict], strategy=None):
    """Backbone (seeded θ⁰) + one head per task + the strategy's surgery; identical on every rank."""
    from forgetless.backbones import TransferModel, build_backbone
    from forgetless.strategies.base import TaskInfo

    init_seed = cfg.pretrain.init_seed if cfg.pretrain.init_seed is not None else cfg.seed
    torch.manual_seed(init_seed)
    backbone = build_backbone(cfg.backbone.name, tuple(tasks_meta[0]["input_shape"]), cfg.backbone.params)
    model = TransferModel(backbone, [t["num_classes"] for t in tasks_meta], seed=cfg.seed)
    if strategy is not None:
        strategy.build(model, [TaskInfo(i, t["name"], t["num_classes"], t["classes"], tuple(t["input_shape"]))
                               for i, t in enumerate(tasks_meta)])
    return model


def load_torch_file(uri: str) -> Any:
    import io

    from forgetless.storage import read_bytes

    # weights_only: a file a user can supply is never unpickled as code.
    return torch.load(io.BytesIO(read_bytes(uri)), map_location="cpu", weights_only=True)


def load_pretrained(model, state: dict[str, torch.Tensor], source_only: bool) -> None:
    """Load a pre-trained backbone (and source head) into a freshly built model; nothing else is touched."""
    wanted = {k: v for k, v in state.items() if k.startswith("backbone.") or k.startswith("heads.t0.")}
    if source_only and not any(k.startswith("backbone.") for k in wanted):
        wanted = {f"backbone.{k}": v for k, v in state.items()}  # a plain backbone state dict
    missing, unexpected = model.load_state_dict(wanted, strict=False)
    # Backbone entries a strategy's surgery added (EXPANSE's new units) cannot be in the pretrained weights.
    added = set(getattr(model, "surgery_added_keys", ()))
    missing_backbone = [k for k in missing if k.startswith("backbone.") and k not in added]
    if missing_backbone or unexpected:
        raise ValueError(
            f"pretrained weights do not match the backbone: missing {missing_backbone[:5]}, unexpected {unexpected[:5]}"
        )


# ---------------------------------------------------------------------------------------------------------------------
# data sharding and evaluation


def _equal_shard(n: int, rank: int, world: int, generator: torch.Generator | None) -> torch.Tensor:
    # Every rank gets the same number of samples so every rank runs the same number of steps (DeepSpeed
    # collectives must match); the few samples beyond a multiple of `world` are dropped for this epoch only.
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    per_rank = n // world
    return order[rank * per_rank : (rank + 1) * per_rank]


def train_batches(x, y, batch_size: int, rank: int, world: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    idx = _equal_shard(len(x), rank, world, g)
    for i in range(0, len(idx), batch_size):
        b = idx[i : i + batch_size]
        yield x[b], y[b]


def derive_seed(*parts: int) -> int:
    """A deterministic seed from integers (Python's hash of strings differs between processes)."""
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**31 - 1)
    return s


@torch.no_grad()
def evaluate(model, tasks, split: str, stage: int, class_incremental: bool, rank: int, world: int, device,
             batch_size: int = 256) -> dict[int, tuple[float, float]]:
    """(accuracy, mean loss) for every task, each rank on its shard, summed over ranks.

    Shards are padded to equal length (padding masked out) so that every rank runs the same forward passes; under
    ZeRO-3 each forward gathers parameters collectively, so a rank with one batch fewer would hang the others.
    """
    import torch.distributed as dist

    was_training = model.training
    model.eval()
    out: dict[int, tuple[float, float]] = {}
    offsets = [0]
    for t in tasks:
        offsets.append(offsets[-1] + t.num_classes)
    for j, task in enumerate(tasks):
        x, y = task.split(split)
        n = len(x)
        per_rank = math.ceil(n / world)
        idx = torch.arange(rank * per_rank, (rank + 1) * per_rank)
        valid = idx < n
        idx = torch.where(valid, idx, torch.zeros_like(idx))
        stats = torch.zeros(3, dtype=torch.float64)  # correct, loss sum, count
        for i in range(0, per_rank, batch_size):
            b, v = idx[i : i + batch_size], valid[i : i + batch_size]
            xb, yb = x[b].to(device), y[b].to(device)
            if class_incremental:
                heads = list(range(max(stage, j) + 1))
                logits = model(xb, heads).float()
                yb_global = yb + offsets[j]
                pred = logits.argmax(1)
                correct = (pred == yb_global)
                loss = F.cross_entropy(logits, yb_global, reduction="none")
            else:
                logits = model(xb, j).float()
                correct = logits.argmax(1) == yb
                loss = F.cross_entropy(logits, yb, reduction="none")
            v = v.to(device)
            stats[0] += correct[v].sum().item()
            stats[1] += loss[v].sum().item()
            stats[2] += v.sum().item()
        if world > 1:
            dist.all_reduce(stats)
        out[j] = (float(stats[0] / stats[2]), float(stats[1] / stats[2]))
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------------------------


def train_worker(job: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker. `job` is plain data (see platform.runner)."""
    from forgetless.platform.engine import ensure_accelerator_env

    ensure_accelerator_env(job["use_gpu"])
    Worker(job).run()


class Worker:
    def __init__(self, job: dict[str, Any]):
        import ray.train

        from forgetless.config import ExperimentConfig
        from forgetless.data import build_stream
        from forgetless.strategies import make_strategy

        self.job = job
        self.cfg = ExperimentConfig(**job["config"])
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.pretrain = job["mode"] == "pretrain"
        tasks = build_stream(self.cfg.source, self.cfg.targets)
        self.tasks = tasks[:1] if self.pretrain else tasks
        self.meta = [{"name": t.name, "num_classes": t.num_classes, "classes": t.classes,
                      "input_shape": list(t.input_shape)} for t in self.tasks]
        if self.pretrain:
            self.strategy = None
            self.optim = self.cfg.pretrain
        else:
            s = job["strategy"]
            self.optim = self.cfg.train
            self.strategy = make_strategy(s["name"], s["params"], self.cfg.train.epochs, self.cfg.train.lr)
        self.model = build_model(self.cfg, self.meta, self.strategy)
        self.class_incremental = self.cfg.evaluation == "class_incremental" and not self.pretrain
        self.state: dict[str, Any] = {
            "stage": 0 if self.pretrain else 1, "phase": 0, "epoch": 0, "phase_done": False, "stage_done": False,
            "finished": False, "global_step": 0, "history": [], "R": [], "mlflow_run_id": None,
            "train_seconds": 0.0, "trainable_params": {}, "phase_log": [], "resumed_from": None,
            "task_names": [m["name"] for m in self.meta],
        }
        self.zero_stage = self.cfg.deepspeed.zero_stage
        self.engine = None

    # -- checkpoints ---------------------------------------------------------------------------------------------------
    def _restore(self) -> bool:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return False
        with ckpt.as_directory() as d:
            self.state = json.loads(Path(d, STATE_FILE).read_text())
            self.model.load_state_dict(torch.load(Path(d, MODEL_FILE), map_location="cpu", weights_only=True))
            self._resume_dir = tempfile.mkdtemp(prefix="forgetless-resume-")
            # Keep a local copy: the DeepSpeed shards are loaded later, once the phase's engine exists.
            import shutil

            shutil.copytree(d, self._resume_dir, dirs_exist_ok=True)
        self.state["resumed_from"] = {k: self.state[k] for k in ("stage", "phase", "epoch", "global_step")}
        self._log(f"resuming from checkpoint: stage {self.state['stage']} phase {self.state['phase']} "
                  f"epoch {self.state['epoch']} step {self.state['global_step']}")
        return True

    def _save(self, metrics: dict[str, float], name: str) -> None:
        """Every rank writes its DeepSpeed shard and reports; rank 0 adds the consolidated model and the state."""
        import ray.train
        from ray.train import Checkpoint

        from forgetless.platform.engine import consolidated_state_dict

        with tempfile.TemporaryDirectory(prefix="forgetless-ckpt-") as d:
            if self.engine is not None and not self.state["phase_done"]:
                self.engine.save_checkpoint(d, tag=DS_TAG)
            state_dict = consolidated_state_dict(self.model, self.zero_stage if self.engine else 0, self.rank)
            if self.rank == 0:
                torch.save(state_dict, Path(d, MODEL_FILE))
                Path(d, STATE_FILE).write_text(json.dumps(self.state))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=name)

    # -- tracking (world rank 0 only) ----------------------------------------------------------------------------------
    def _start_tracking(self) -> None:
        from forgetless.platform import tracking

        if self.rank != 0:
            return
        t = self.job["tracking"]
        uri, exp = t["tracking_uri"], t["experiment_id"]
        run_id = self.state.get("mlflow_run_id") or tracking.find_unfinished_run(uri, exp, self.job["run_key"])
        c = tracking.client(uri)
        tags = {tracking.RUN_KEY_TAG: self.job["run_key"], "forgetless.mode": self.job["mode"],
                "forgetless.evaluation": self.cfg.evaluation, "forgetless.run_name": self.job["run_name"]}
        if t.get("parent_run_id"):
            tags[tracking.PARENT_TAG] = t["parent_run_id"]
        if self.strategy is not None:
            tags.update(self.strategy.tags())
        if run_id is None:
            run_id = c.create_run(exp, run_name=self.job["display_name"], tags=tracking.redact(tags)).info.run_id
        else:
            for k, v in tags.items():
                c.set_tag(run_id, k, v)
            c.update_run(run_id, status="RUNNING")
        self.state["mlflow_run_id"] = run_id
        params = tracking.flatten("", {k: v for k, v in self.job["config"].items() if k not in ("strategies",)})
        if self.strategy is not None:
            params.update(tracking.flatten("strategy", self.job["strategy"]))
        params["ray.num_workers"] = self.world
        tracking.log_params(uri, run_id, params)

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        from forgetless.platform import tracking

        if self.rank == 0:
            tracking.log_metrics(self.job["tracking"]["tracking_uri"], self.state["mlflow_run_id"], metrics,
                                 step=self.state["global_step"])

    def _log(self, msg: str) -> None:
        if self.rank == 0:
            # Not print(): Ray Train patches print on workers to both echo the line and log it, so every line would
            # reach the driver twice.
            sys.stdout.write(f"[forgetless {self.job['display_name']}] {msg}\n")
            sys.stdout.flush()

    # -- evaluation ----------------------------------------------------------------------------------------------------
    def _eval_point(self, stage: int, train_loss: float | None, phase_name: str, epoch: int) -> dict[str, float]:
        res = evaluate(self.model, self.tasks, "val", stage, self.class_incremental, self.rank, self.world, self.device)
        point: dict[str, Any] = {"step": self.state["global_step"], "stage": stage, "phase": phase_name,
                                 "epoch": epoch, "acc": {str(j): a for j, (a, _) in res.items()},
                                 "loss": {str(j): l for j, (_, l) in res.items()}, "train_loss": train_loss}
        self.state["history"].append(point)
        metrics: dict[str, float] = {"source/acc": res[0][0], "source/loss": res[0][1], "stage": stage}
        if not self.pretrain:
            metrics["target/acc"] = res[stage][0]
            metrics["target/loss"] = res[stage][1]
        for j, (a, _) in res.items():
            metrics[f"task/{self.meta[j]['name']}/acc"] = a
        if train_loss is not None:
            metrics["train/loss"] = train_loss
        self._log_metrics(metrics)
        return metrics

    def _record_row(self, stage: int) -> dict[str, float]:
        res = evaluate(self.model, self.tasks, "test", stage, self.class_incremental, self.rank, self.world,
                       self.device)
        row = [res[j][0] for j in range(len(self.tasks))]
        self.state["R"].append(row)
        return {f"R/{stage}/{self.meta[j]['name']}": a for j, a in enumerate(row)}

    # -- main loop -----------------------------------------------------------------------------------------------------
    def run(self) -> None:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.job["use_gpu"] else "gloo")
        self.model.to(self.device)
        resumed = self._restore()
        if not resumed and self.job.get("init_weights"):
            load_pretrained(self.model, load_torch_file(self.job["init_weights"]), source_only=self.pretrain)
        self._start_tracking()
        if self.state["finished"]:
            self._log("already finished; nothing to do")
            self._save({"finished": 1}, name=FINAL_CHECKPOINT)
            return

        if self.pretrain:
            stages = [0]
            if not resumed:
                self._eval_point(0, None, "init", 0)
                self._save({"epoch": 0, "global_step": 0}, name="stop_point_e0000")
        else:
            stages = list(range(1, len(self.tasks)))
            if not resumed:
                # What the strategy keeps of the pre-trained model (anchors, Fisher, frozen copies), before row 0.
                self._prepare_strategy()
                self._strategy_data_hook("after_source", 0)
                # Row 0 of R and the first point of every curve: the pre-trained model before any target training.
                self._record_row(0)
                self._eval_point(0, None, "before", 0)
        for stage in stages:
            if stage < self.state["stage"] or (stage == self.state["stage"] and self.state["stage_done"]):
                continue
            if stage > self.state["stage"]:
                self.state.update(stage=stage, phase=0, epoch=0, phase_done=False, stage_done=False)
            self._run_stage(stage)
        self.state["finished"] = True
        self._log(f"finished after {self.state['global_step']} optimizer steps")
        self._save({"finished": 1, "global_step": self.state["global_step"]}, name=FINAL_CHECKPOINT)

    def _phases(self, stage: int):
        from forgetless.strategies.base import ParamGroup, Phase, TaskInfo

        if self.strategy is not None:
            task = TaskInfo(stage, self.meta[stage]["name"], self.meta[stage]["num_classes"], self.meta[stage]["classes"],
                            tuple(self.meta[stage]["input_shape"]))
            return task, self.strategy.phases(self.model, task)
        task = TaskInfo(0, self.meta[0]["name"], self.meta[0]["num_classes"], self.meta[0]["classes"])
        if self.job.get("init_weights") or getattr(self.model.backbone, "pretrained", False):
            # A given backbone without a source head (weights from backbone.weights, or a backbone that loads its
            # own, e.g. a Hugging Face folder): train only the source head (backbone frozen).
            params = list(self.model.heads["t0"].parameters())
            return task, [Phase("source_head", self.optim.epochs, [ParamGroup("head", params, self.optim.lr)],
                                eval_modules=[self.model.backbone])]
        return task, [Phase("pretrain", self.optim.epochs,
                            [ParamGroup("all", list(self.model.backbone.parameters()) +
                                        list(self.model.heads["t0"].parameters()), self.optim.lr)])]

    def _run_stage(self, stage: int) -> None:
        from forgetless.platform.engine import gathered, make_engine, set_train_mode, write_back_weights

        task, phases = self._phases(stage)
        data = self.tasks[stage]
        for p_idx in range(len(phases)):
            # Fresh phase objects: the model may have been rebuilt since (their parameter lists must be its own).
            phase = self._phases(stage)[1][p_idx]
            if p_idx < self.state["phase"] or (p_idx == self.state["phase"] and self.state["phase_done"]):
                continue
            if p_idx > self.state["phase"]:
                self.state.update(phase=p_idx, epoch=0, phase_done=False)
            self.engine = make_engine(self.model, phase, self.optim, self.cfg.deepspeed, self.world,
                                      self.job["use_gpu"])
            # ds_numel: under ZeRO-3 a parameter's local tensor is an empty partition once the engine exists.
            n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in phase.trainable())
            self.state["trainable_params"][f"{stage}/{phase.name}"] = n_trainable
            resume_dir = getattr(self, "_resume_dir", None)
            if resume_dir and self.state["epoch"] > 0 and Path(resume_dir, DS_TAG).exists():
                # Optimizer (and scheduler) state of the interrupted phase; model weights were loaded already.
                self.engine.load_checkpoint(resume_dir, tag=DS_TAG)
            self._resume_dir = None
            phase_losses = [h["loss"][str(stage)] for h in self.state["history"]
                            if h["stage"] == stage and h["phase"] == phase.name]
            phase_step = self.state.get("phase_step", 0) if self.state["epoch"] > 0 else 0
            self._log(f"stage {stage} ({task.name}) phase {phase.name}: {n_trainable} trainable parameters, "
                      f"{phase.epochs} epochs")
            stop = False
            for epoch in range(self.state["epoch"], phase.epochs):
                set_train_mode(self.model, phase)
                t0 = time.perf_counter()
                seed = derive_seed(self.cfg.seed, stage, p_idx, epoch)
                losses = []
                gen = torch.Generator().manual_seed(seed)
                for xb, yb in train_batches(data.x_train, data.y_train, self.optim.batch_size, self.rank, self.world,
                                            seed):
                    xb, yb = xb.to(self.device), yb.to(self.device)
                    if phase.augment is not None:
                        xb = phase.augment(xb, gen)
                    logits = self.engine(xb, stage)
                    loss = F.cross_entropy(logits.float(), yb)
                    extra = self.strategy.extra_loss(self.model, xb, yb, task, logits) if self.strategy else None
                    if extra is not None:
                        loss = loss + extra
                    self.engine.backward(loss)
                    # Under gradient accumulation engine.step() updates the weights only on the last micro-batch of
                    # each group; steps (global_step, phase_step, eval_every_steps, max_steps) count those updates.
                    boundary = self.engine.is_gradient_accumulation_boundary()
                    if boundary and phase.before_step is not None:
                        with gathered(self.model, self.zero_stage):  # hooks see full weights, also under ZeRO-3
                            phase.before_step(self.model)
                    self.engine.step()
                    losses.append(loss.item())
                    if not boundary:
                        continue
                    if phase.after_step is not None:
                        with gathered(self.model, self.zero_stage):
                            phase.after_step(self.model)
                            write_back_weights(self.model)  # else DeepSpeed's master copy undoes the hook's rewrite
                    self.state["global_step"] += 1
                    phase_step += 1
                    if phase.eval_every_steps or self.optim.eval_every_steps:
                        every = phase.eval_every_steps or self.optim.eval_every_steps
                        if phase_step % every == 0:
                            m = self._eval_point(stage, sum(losses[-every:]) / len(losses[-every:]), phase.name, epoch)
                            set_train_mode(self.model, phase)
                            phase_losses.append(m["source/loss"] if self.pretrain else m["target/loss"])
                            if phase.stop_rule is not None and phase.stop_rule(phase_losses):
                                stop = True
                                break
                    if phase.max_steps is not None and phase_step >= phase.max_steps:
                        stop = True
                        break
                self.state["train_seconds"] += time.perf_counter() - t0
                train_loss = sum(losses) / max(1, len(losses))
                metrics = self._eval_point(stage, train_loss, phase.name, epoch + 1)
                if not (phase.eval_every_steps or self.optim.eval_every_steps):
                    phase_losses.append(metrics["source/loss"] if self.pretrain else metrics["target/loss"])
                    if phase.stop_rule is not None and phase.stop_rule(phase_losses):
                        stop = True
                self.state["epoch"] = epoch + 1
                self.state["phase_step"] = phase_step
                done = stop or epoch + 1 == phase.epochs
                self.state["phase_done"] = done
                if done:
                    self.state["phase_log"].append({"stage": stage, "phase": phase.name, "epochs": epoch + 1,
                                                    "steps": phase_step, "stopped_early": stop,
                                                    "end_step": self.state["global_step"]})
                shown = {k: round(v, 4) for k, v in metrics.items() if k in ("source/acc", "target/acc", "train/loss")}
                self._log(f"stage {stage} phase {phase.name} epoch {epoch + 1}/{phase.epochs} "
                          f"step {self.state['global_step']} {shown}")
                if self._should_checkpoint(epoch + 1, phase.epochs, done):
                    name = (f"stop_point_e{epoch + 1:04d}" if self.pretrain
                            else f"checkpoint_s{stage}_p{p_idx}_e{epoch + 1:04d}")
                    self._save({**metrics, "epoch": epoch + 1, "global_step": self.state["global_step"]}, name)
                if stop:
                    self._log(f"phase {phase.name} ended early at step {phase_step} by its stop rule")
                    break
            self.state["phase_done"] = True
            self._release_engine()
        # the task is done: the strategy keeps what it needs, then the accuracy-matrix row is measured
        if self.strategy is not None:
            self._strategy_data_hook("after_task", stage)
        row = self._record_row(stage) if not self.pretrain else {}
        self.state["stage_done"] = True
        if not self.pretrain:
            self._log_metrics(row)
            self._save({**row, "global_step": self.state["global_step"]}, name=f"checkpoint_s{stage}_done")

    def _prepare_strategy(self) -> None:
        """The strategy's `prepare` hook (every rank, full weights, no engine yet), with the source data, a sharded
        source evaluation, and, for a strategy that needs it, the pre-training trajectory's state dicts."""
        import torch.distributed as dist

        from forgetless.strategies.base import PrepareContext

        def mean(t: torch.Tensor) -> torch.Tensor:
            if self.world > 1:
                dist.all_reduce(t)
                t /= self.world
            return t

        def source_accuracy(model) -> float:
            return evaluate(model, self.tasks[:1], "val", 0, False, self.rank, self.world, self.device)[0][0]

        def log_metrics(metrics: dict[str, float], step: int) -> None:
            from forgetless.platform import tracking

            if self.rank == 0:
                tracking.log_metrics(self.job["tracking"]["tracking_uri"], self.state["mlflow_run_id"], metrics,
                                     step=step)

        trajectory = None
        if self.strategy.needs_trajectory:
            trajectory = [(sp["epoch"], load_torch_file(sp["uri"])) for sp in self.job.get("trajectory") or []]
        src = self.tasks[0]
        self.strategy.prepare(self.model, PrepareContext(
            rank=self.rank, world=self.world, device=self.device, source_train=(src.x_train, src.y_train),
            all_reduce_mean=mean, source_accuracy=source_accuracy, log=self._log, log_metrics=log_metrics,
            load_weights=load_torch_file, pretrain=self.cfg.pretrain, final_epoch=self.cfg.pretrain.epochs,
            trajectory=trajectory))

    def _strategy_data_hook(self, hook: str, stage: int) -> None:
        """Call the strategy's `after_task` / `after_source` with this rank's training shard of task `stage` and a
        cross-rank mean (every rank calls it, so collectives inside match)."""
        import torch.distributed as dist

        from forgetless.strategies.base import TaskInfo

        def mean(t: torch.Tensor) -> torch.Tensor:
            if self.world > 1:
                dist.all_reduce(t)
                t /= self.world
            return t

        m, data = self.meta[stage], self.tasks[stage]
        task = TaskInfo(stage, m["name"], m["num_classes"], m["classes"], tuple(m["input_shape"]))
        seed = derive_seed(self.cfg.seed, stage, 10**6)
        getattr(self.strategy, hook)(
            self.model, task,
            lambda: ((x.to(self.device), y.to(self.device)) for x, y in
                     train_batches(data.x_train, data.y_train, self.optim.batch_size, self.rank, self.world, seed)),
            mean)

    def _release_engine(self) -> None:
        """End of a phase: back to a plain model on full weights (gathered under ZeRO-3, fp32), so the next phase's
        surgery, the strategy's after-task hook and evaluation all see full weights, and the next engine starts
        from an unpartitioned module."""
        from forgetless.platform.engine import full_state_dict

        if self.engine is None:
            return
        full = full_state_dict(self.model, self.zero_stage)
        self.engine = None
        self.model = build_model(self.cfg, self.meta, self.strategy)
        self.model.load_state_dict(full)
        self.model.to(self.device)

    def _should_checkpoint(self, epoch: int, total: int, done: bool) -> bool:
        if not self.pretrain:
            return True
        # Pre-training checkpoints are the stop points of the trajectory: every k epochs and the last.
        return epoch % self.cfg.pretrain.checkpoint_every == 0 or done
