"""The progress file of a run: world rank 0 writes `progress.json` into the run's storage folder (local or s3://) when
it starts, at every epoch's end and when it finishes; the driver's progress board (platform/driver/progress_board.py)
reads it. Storage is the one channel that reaches the driver from every node.
"""
from __future__ import annotations

import json
import time
from typing import Any

from forgetless import storage

PROGRESS_FILE = "progress.json"


def progress_record(run: str, stage: int, stages: list[int], phase: str, phase_index: int, phases: int, epoch: int,
                    epochs: int, step: int, target_acc: float | None, source_acc: float | None,
                    finished: bool = False, resumed_from: dict[str, int] | None = None) -> dict[str, Any]:
    """What a run's rank 0 writes. `done` = the fraction of the run's epochs behind it, counting each stage and each
    phase of a stage equally (the ETA's basis). `resumed_from`: where this invocation restored the run (its
    checkpoint's stage, phase, epoch and global_step; RunState.resumed_from), in every record it writes, so the board
    says where the run resumed even when it never saw the start record (S3: a look every 5 s)."""
    position = stages.index(stage) if stage in stages else 0
    in_stage = (phase_index + (epoch / epochs if epochs else 1.0)) / max(phases, 1)
    done = 1.0 if finished else min(1.0, (position + in_stage) / max(len(stages), 1))
    return {"run": run, "stage": stage, "stages": len(stages), "stage_position": position + 1, "phase": phase,
            "epoch": epoch, "epochs": epochs, "step": step, "target_acc": target_acc, "source_acc": source_acc,
            "done": done, "finished": finished, "resumed_from": resumed_from, "time": time.time()}


def after_startup(record: dict[str, Any]) -> bool:
    """Has the run written this record after its start-up: an epoch ended, or the run finished? (Its start record,
    phase "-", is written once its workers are up, before its engine and training.)"""
    return record["phase"] != "-" or bool(record.get("finished"))


def final_accuracies(history: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(target, source) validation accuracy of a run's last evaluation (RunState.history): the numbers its MLflow
    run ends with (`val/target/acc`, `val/source/acc`). The target of an evaluation is the task of its stage (the
    first target for the "before" point of stage 0); a run over the source only has no target."""
    if not history:
        return None, None
    last = history[-1]
    acc = last.get("acc", {})
    return acc.get(str(max(int(last["stage"]), 1))), acc.get("0")


def write_progress(run_uri: str, record: dict[str, Any]) -> None:
    storage.write_bytes(storage.join(run_uri, PROGRESS_FILE), json.dumps(record).encode())


def read_progress(run_uri: str, since: float | None = None) -> dict[str, Any] | None:
    """The run's progress record; None when there is none or (with `since`) when it was written before `since`: a
    file left by an earlier invocation of the run (killed, stopped) is not where the run stands now."""
    uri = storage.join(run_uri, PROGRESS_FILE)
    try:
        record = json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None
    except (OSError, ValueError):  # being rewritten, or storage trouble: the next look will do
        return None
    if record is not None and since is not None and record.get("time", 0.0) < since:
        return None
    return record
