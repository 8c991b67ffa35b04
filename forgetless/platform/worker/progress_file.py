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
                    finished: bool = False) -> dict[str, Any]:
    """What a run's rank 0 writes. `done` = the fraction of the run's epochs behind it, counting each stage and each
    phase of a stage equally (the ETA's basis)."""
    position = stages.index(stage) if stage in stages else 0
    in_stage = (phase_index + (epoch / epochs if epochs else 1.0)) / max(phases, 1)
    done = 1.0 if finished else min(1.0, (position + in_stage) / max(len(stages), 1))
    return {"run": run, "stage": stage, "stages": len(stages), "stage_position": position + 1, "phase": phase,
            "epoch": epoch, "epochs": epochs, "step": step, "target_acc": target_acc, "source_acc": source_acc,
            "done": done, "finished": finished, "time": time.time()}


def write_progress(run_uri: str, record: dict[str, Any]) -> None:
    storage.write_bytes(storage.join(run_uri, PROGRESS_FILE), json.dumps(record).encode())


def read_progress(run_uri: str) -> dict[str, Any] | None:
    uri = storage.join(run_uri, PROGRESS_FILE)
    try:
        return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None
    except (OSError, ValueError):  # being rewritten, or storage trouble: the next look will do
        return None
