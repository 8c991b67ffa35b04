"""A worker's checkpoint and weights I/O: every rank's DeepSpeed shard and report, the consolidated model (or each
rank's ZeRO-3 partition), the Hugging Face export of an hf: backbone, the manifest written last, and restore from
the newest intact checkpoint (weights-only loading throughout), on any number of workers (per-rank files written by
another count are cut again for this one: reshard.py).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from forgetless import storage
from forgetless.backbones import hf
from forgetless.backbones.hf import HFBackbone
from forgetless.platform.worker import checkpoints, reshard, timing
from forgetless.platform.worker import engine as ds
from forgetless.platform.worker.engine import consolidated_state_dict
from forgetless.platform.worker.job import RunState
from forgetless.platform.worker.run_reporting import detail, log, warn
from forgetless.platform.worker.worker_run import WorkerRun

STATE_FILE = "state.json"


MODEL_FILE = "model.pt"


PARTITION_FILE = "model_partition_rank{rank}.pt"  # under ZeRO-3 on partitions: each rank's slices of the weights


HF_EXPORT_DIR = "hf"  # in the final checkpoint of an hf: backbone: the model as a Hugging Face folder


# with an unmerged LoRA update (lora's merge_after_task: false): the PEFT adapter folder and the model it applies to
HF_ADAPTER_DIR, HF_BASE_DIR = "hf_adapter", "hf_base"


DS_TAG = "ds"


FINAL_CHECKPOINT = "final"  # the checkpoint of a finished run (its state.json has finished: true)


def save_checkpoint(run: WorkerRun, metrics: dict[str, float], name: str) -> None:
    """Every rank writes its DeepSpeed shard and reports; rank 0 adds the consolidated model and the state, and once
    Ray Train has committed the checkpoint (so every rank's files are uploaded) writes its manifest last. Waiting for
    the commit makes the checkpoint just written the resume point of a lost worker (the controller commits when it
    next polls: every 0.2 s as forgetless starts it, ray_cluster.CONTROLLER_POLL_S), so at most the epoch in progress is
    re-trained."""
    if name in run.skipped_checkpoints and name != FINAL_CHECKPOINT:
        # Ray Train still lists the damaged checkpoint under this folder name; a second checkpoint in the same folder
        # would be deleted twice when Ray Train rotates old checkpoints out, and its controller fails on the second.
        log(run, f"not writing checkpoint {name}: its folder holds a damaged checkpoint that Ray Train still lists")
        ray.train.report(metrics)
        return
    t_save = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="forgetless-ckpt-") as d:
        if run.engine is not None and not run.state.phase_done:
            run.engine.save_checkpoint(d, tag=DS_TAG)
        write_weights(run, Path(d), final=name == FINAL_CHECKPOINT)
        if run.rank == 0:
            run.state.saved_at = time.time()
            Path(d, STATE_FILE).write_text(run.state.to_json())
        files = checkpoints.gather_files(checkpoints.describe_files(d), run.world)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=name)
    timing.add(run.state.seconds, "checkpoint_save", time.perf_counter() - t_save)
    if run.rank != 0:
        return
    t0 = time.perf_counter()
    committed = checkpoints.wait_until_committed(name)
    run.commit_wait_seconds += time.perf_counter() - t0
    timing.add(run.state.seconds, "checkpoint_commit", time.perf_counter() - t0)
    run.commits += 1
    if name == FINAL_CHECKPOINT:
        detail(run, f"{run.commits} checkpoints written; waited {run.commit_wait_seconds:.1f} s in all for Ray "
                    f"Train to commit them ({run.commit_wait_seconds / run.commits:.2f} s each)")
    if not committed:
        warn(run, f"checkpoint {name} was not committed by Ray Train within {checkpoints.COMMIT_TIMEOUT_S:.0f} s; "
                  f"it gets no manifest and is not a resume point")
        return
    storage.write_bytes(storage.join(checkpoint_uri(run, name), checkpoints.MANIFEST_FILE),
                        checkpoints.manifest_bytes(files))


def write_weights(run: WorkerRun, folder: Path, final: bool) -> None:
    """The weights of a checkpoint. Whole model: `model.pt` (rank 0, gathered under ZeRO-3). On partitions: each
    rank's own slices, and, at the end of the run or at a stop point that later runs load, the consolidated
    `model.pt`, gathered one parameter at a time onto rank 0 (the only full copy). The final checkpoint of an hf:
    backbone also holds the backbone as a Hugging Face folder (`hf/`)."""
    if run.partitioned:
        torch.save(ds.partition_state(run.model), folder / PARTITION_FILE.format(rank=run.rank))
        export = final or run.job.checkpoints.exports_model
        state = ds.streamed_state_dict(run.model, run.rank) if export else None
    else:
        state = consolidated_state_dict(run.model, run.zero_stage if run.engine else 0, run.rank)
    if run.rank != 0 or state is None:
        return
    torch.save(state, folder / MODEL_FILE)
    if final and isinstance(run.model.backbone, HFBackbone):
        export_hf_folder(run.model.backbone, state, folder / HF_EXPORT_DIR)
        log(run, f"exported the backbone as a Hugging Face folder ({HF_EXPORT_DIR}/ in the final checkpoint)")


def export_hf_folder(backbone: HFBackbone, state: dict[str, torch.Tensor], dest: Path) -> None:
    """The backbone of a consolidated TransferModel state dict as a Hugging Face folder. A model with LoRA layers
    (whole on every rank: lora does not work on partitions) is merged first; its update, when not merged already, is
    written as a PEFT adapter folder too, with the model it applies to."""
    prefix = "backbone.model."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if any("lora_" in k for k in weights):
        hf.save_pretrained(backbone, dest)
        hf.save_lora_adapter(backbone, weights, dest.parent / HF_ADAPTER_DIR, dest.parent / HF_BASE_DIR)
    else:
        hf.save_pretrained_state(backbone, weights, dest)


def checkpoint_uri(run: WorkerRun, name: str) -> str:
    """Where Ray Train put the checkpoint folder `name` of this run (RunConfig(storage_path, name))."""
    return storage.join(storage.normalize(run.job.config.storage), run.job.run_name, name)


def restore(run: WorkerRun) -> bool:
    """Load the newest intact checkpoint of this run name, if any: state and weights now, optimizer later.

    World rank 0 picks it (newest committed first; one that fails its manifest is skipped with a warning naming it)
    and tells the others, and every rank loads only from a local copy it has verified itself."""
    if ray.train.get_checkpoint() is None:
        return False
    name, local, skipped = pick_intact_checkpoint(run) if run.rank == 0 else (None, None, ())
    if run.world > 1:
        chosen = [name, skipped]
        dist.broadcast_object_list(chosen, src=0)
        name, skipped = chosen
    run.skipped_checkpoints = tuple(skipped)
    if name is None:
        return False
    if local is None:
        local = tempfile.mkdtemp(prefix="forgetless-resume-")
        problem = checkpoints.fetch_verified(checkpoint_uri(run, name), local)
        if problem:
            raise RuntimeError(f"checkpoint {checkpoint_uri(run, name)} changed while it was restored: {problem}")
    run.state = RunState.from_json(Path(local, STATE_FILE).read_text())
    written = checkpoint_world_size(Path(local), run.state)
    if written is not None and written != run.world:
        log(run, f"resuming a checkpoint written by {written} workers on {run.world} workers")
    load_weights(run, Path(local))
    run.resume_dir = local  # the DeepSpeed shards are loaded once the phase's engine exists
    run.state.resumed_from = run.state.position()
    pos = run.state.resumed_from
    log(run, f"resuming from checkpoint {name}: stage {pos['stage']} phase {pos['phase']} epoch {pos['epoch']} "
             f"step {pos['global_step']}")
    return True


def checkpoint_world_size(folder: Path, state: RunState | None = None) -> int | None:
    """How many workers wrote the checkpoint in (a local copy of) `folder`: its per-rank files tell (the ZeRO-3
    partitions, DeepSpeed's optimizer shards), else the run state's last worker-count record; None where neither does
    (a ZeRO-0 checkpoint of an older run: its files do not depend on the count)."""
    parts = partition_files(folder)
    if parts:
        return len(parts)
    shards = reshard.written_world_size(folder / DS_TAG)
    if shards:
        return shards
    records = getattr(state, "workers", None) or []
    return records[-1]["workers"] if records else None


def partition_files(folder: Path) -> list[Path]:
    """The ZeRO-3 partition files of a checkpoint folder, in rank order (every rank's, or none)."""
    found = {int(p.stem.rsplit("rank", 1)[1]): p for p in folder.glob(PARTITION_FILE.format(rank="*"))}
    if sorted(found) != list(range(len(found))):
        raise RuntimeError(f"checkpoint {folder.name} has ZeRO-3 partitions of ranks {sorted(found)}: some are missing")
    return [found[r] for r in range(len(found))]


def load_weights(run: WorkerRun, folder: Path) -> None:
    """The weights of a verified local checkpoint copy: this rank's partition (cut again from every rank's when
    another number of workers wrote them), or the whole model."""
    if not run.partitioned:
        run.model.load_state_dict(checkpoints.safe_torch_load(folder / MODEL_FILE, map_location="cpu",
                                                              deepspeed_types=False))
        return
    parts = partition_files(folder)
    if not parts:
        raise RuntimeError(f"checkpoint {folder.name} has no ZeRO-3 partitions (written before the model was kept "
                           f"partitioned); resume with the deepspeed.zero_stage that wrote it")
    if len(parts) == run.world:
        state = checkpoints.safe_torch_load(parts[run.rank], map_location="cpu", deepspeed_types=False)
    else:
        with refused_names_count(len(parts)):
            state = reshard.resharded_partition_state(run.model, parts, run.rank, run.world)
    ds.load_partition_state(run.model, state)


@contextmanager
def refused_names_count(written: int):
    """A re-shard forgetless cannot do says which worker count resumes the checkpoint as it is."""
    try:
        yield
    except reshard.ReshardRefused as e:
        raise RuntimeError(f"the checkpoint was written by {written} workers and cannot be cut for another count: "
                           f"{e}; resume with scaling.num_workers: {written}") from None


def pick_intact_checkpoint(run: WorkerRun) -> tuple[str | None, str | None, list[str]]:
    """(name, verified local copy, names skipped) of the newest committed checkpoint that passes its manifest;
    name and copy are None if none does, and the run starts over."""
    names = checkpoints.committed_checkpoint_names()
    skipped: list[str] = []
    for name in names:
        uri = checkpoint_uri(run, name)
        local = tempfile.mkdtemp(prefix="forgetless-resume-")
        problem = checkpoints.fetch_verified(uri, local)
        if problem is None:
            return name, local, skipped
        shutil.rmtree(local, ignore_errors=True)
        skipped.append(name)
        warn(run, f"checkpoint {uri} is damaged or incomplete, skipping it: {problem}")
    warn(run, f"none of the {len(names)} checkpoints of run {run.job.run_name} is intact; starting over")
    return None, None, skipped


def _optimizer_state_to_resume(run: WorkerRun) -> Path | None:
    """The DeepSpeed folder whose optimizer state the phase about to start resumes (an interrupted phase's), if any."""
    ds_dir = Path(run.resume_dir, DS_TAG) if run.resume_dir else None
    return ds_dir if ds_dir is not None and run.state.epoch > 0 and ds_dir.exists() else None


def resumes_optimizer_shards(run: WorkerRun) -> bool:
    """Does the phase about to start resume optimizer state that ZeRO-1/2 wrote one file per rank (resume_optimizer
    loads it)? Such a phase keeps its configured ZeRO stage (train_loop.engine_batch)."""
    ds_dir = _optimizer_state_to_resume(run)
    return ds_dir is not None and bool(reshard.shard_files(ds_dir))


def resume_optimizer(run: WorkerRun) -> None:
    """Optimizer (and scheduler) state of the interrupted phase; its weights were loaded by `restore`. The shards
    are loaded weights-only: DeepSpeed's own checkpoint engine would unpickle anything a file holds. Shards written by
    another number of workers are cut again for this one (reshard.load_resharded)."""
    ds_dir = _optimizer_state_to_resume(run)
    if ds_dir is not None:
        written = reshard.written_world_size(ds_dir)
        if written is not None and written != run.world:  # per-rank shards of another count: cut again
            with refused_names_count(written):
                reshard.load_resharded(run.engine, ds_dir, run.rank, run.world)
        else:  # the same count, or ZeRO-0's one file (any count)
            checkpoints.install_weights_only_loader(run.engine)
            run.engine.load_checkpoint(run.resume_dir, tag=DS_TAG)
    if run.resume_dir:
        shutil.rmtree(run.resume_dir, ignore_errors=True)
    run.resume_dir = None
