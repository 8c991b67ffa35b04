"""Ray Train's placement-group cleaner, done by the driver of an embedded cluster instead of by one more process.

Every `TorchTrainer.fit()` of Ray Train V2 starts a detached `PlacementGroupCleaner` actor: a Python process that
imports Ray Train, watches the run's controller once a second, and removes the run's placement group if the controller
dies without removing it itself (the group is the controller's, and Ray keeps it for as long as the job lives). On a
2-core machine that process costs every run about 3-4 s (its start competes with the controller's and the workers',
and the controller waits up to ~1 s for it to stop at the end): `benchmarks/fixed_cost.py --floor` measures it.

In an embedded cluster the driver is on the controller's machine and outlives every run it starts (and when the driver
dies, the reaper ends the whole cluster), so the driver does the same job without a process: a callback in the
controller records each placement group it creates in a file, and after `fit()` returns or raises the driver removes
any recorded group still there. A cluster of your own (`--address`, a Ray job) keeps Ray Train's own cleaner.

This leans on two of Ray Train V2's internals (the trainer's list of default callbacks, the worker group's placement
group handle): where they are not as expected, the trainer is left as Ray made it.
"""
from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import ray
from ray.train.torch import TorchTrainer
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from forgetless.console import say

logger = logging.getLogger(__name__)

try:  # Ray Train V2 internals (ray 2.60); without them nothing changes
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback
except ImportError:  # pragma: no cover - another Ray version
    PlacementGroupCleanerCallback = WorkerGroupCallback = None


if WorkerGroupCallback is not None:
    class RecordPlacementGroups(WorkerGroupCallback):
        """Runs in the Train controller: appends the id of every placement group a worker group starts with to a file
        on the controller's (= the driver's) machine. A restarted worker group gets a new group: one line each."""

        def __init__(self, record_file: str):
            self.record_file = record_file

        def after_worker_group_start(self, worker_group) -> None:
            try:
                group = worker_group.get_worker_group_state().placement_group_handle.placement_group
                with open(self.record_file, "a") as f:
                    f.write(group.id.hex() + "\n")
            except Exception as e:  # recording is best effort: the run itself must not fail for it
                logger.warning("forgetless could not record the run's placement group (%s); if the Train controller "
                               "dies the group may keep its CPUs until the driver exits", e)


def replaceable() -> bool:
    """Whether this Ray has the internals the replacement needs."""
    return (PlacementGroupCleanerCallback is not None
            and callable(getattr(TorchTrainer, "_create_default_callbacks", None)))


class DriverCleanedTorchTrainer(TorchTrainer):
    """A TorchTrainer without Ray Train's PlacementGroupCleaner process; `record_file` collects the run's placement
    groups for `remove_recorded` (use through `cleaned_by_driver`)."""

    def __init__(self, *args, record_file: str, **kwargs):
        self._record_file = record_file
        super().__init__(*args, **kwargs)

    def _create_default_callbacks(self):
        callbacks = [c for c in super()._create_default_callbacks()
                     if not isinstance(c, PlacementGroupCleanerCallback)]
        return callbacks + [RecordPlacementGroups(self._record_file)]


def remove_recorded(record_file: str) -> list[str]:
    """Remove every placement group listed in `record_file` that still exists; returns the ids removed."""
    if not os.path.exists(record_file):
        return []
    removed = []
    for line in Path(record_file).read_text().split():
        group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(line)))
        if placement_group_table(group).get("state") not in (None, "REMOVED"):
            remove_placement_group(group)
            removed.append(line)
    return removed


@contextmanager
def cleaned_by_driver():
    """Yields the record file to give `DriverCleanedTorchTrainer`; on the way out (the fit returned or raised) every
    placement group the run left behind is removed."""
    folder = tempfile.mkdtemp(prefix="forgetless-placement-groups-")
    record_file = os.path.join(folder, "groups.txt")
    try:
        yield record_file
    finally:
        try:
            removed = remove_recorded(record_file)
            if removed:
                say(f"removed {len(removed)} placement group(s) the run's Train controller left behind (it ended "
                    f"without removing them): {', '.join(removed)}")
        finally:
            Path(record_file).unlink(missing_ok=True)
            os.rmdir(folder)
