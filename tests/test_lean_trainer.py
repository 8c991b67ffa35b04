"""A fit of forgetless's trainer starts no DatasetManager (it has no datasets) and, in an embedded cluster, no
PlacementGroupCleaner: the driver removes the placement group a Train controller that died left behind (the one job
Ray Train's cleaner did). On an embedded cluster no AutoscalingCoordinator starts either. Its Train controller loads
no torch; its workers do, and join one process group."""
import dataclasses
import os
import signal
import sys
import threading
import time

import psutil
import pytest
from ray import cloudpickle
from ray.train import RunConfig, ScalingConfig
from ray._private import state as gcs_state

from forgetless.platform import lean_trainer, runner

pytestmark = pytest.mark.e2e


def _sleep_in_training():
    import torch.distributed as dist

    assert dist.is_initialized() and dist.get_world_size() == 2 and dist.get_backend() == "gloo"
    time.sleep(120)


# The workers cannot import this test module: its train function travels by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclasses.dataclass
class Actor:
    actor_id: str
    pid: int


def _alive(class_name: str) -> list[Actor]:
    # The GCS's actor table (Ray's state API needs the dashboard, which an embedded cluster starts only when asked)
    return [Actor(a["ActorID"], a["Pid"]) for a in gcs_state.actors().values()
            if a["ActorClassName"] == class_name and a["State"] == "ALIVE"]


def _loads_torch(pid: int) -> bool:
    return any("libtorch" in os.path.basename(m.path) for m in psutil.Process(pid).memory_maps())


def _wait_for(predicate, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"waited {seconds:.0f} s for {what}")


def test_a_killed_controllers_group_is_removed_by_the_driver(ray_session, tmp_path, capsys):
    assert runner._EMBEDDED_CLUSTER and lean_trainer.replaceable()
    cpus = ray_session.cluster_resources()["CPU"]
    outcome = {}

    def fit():
        try:
            with lean_trainer.cleaned_by_driver() as record_file:
                outcome["record_file"] = record_file
                lean_trainer.LeanTorchTrainer(
                    _sleep_in_training, record_file=record_file, asks_autoscaler=False,
                    scaling_config=ScalingConfig(num_workers=2),
                    run_config=RunConfig(name="killed-controller", storage_path=str(tmp_path))).fit()
        except Exception as e:  # the controller's death ends the fit with an error
            outcome["error"] = e

    # Actors of earlier tests may still be listed as alive for a while: this run's are the ones not there before.
    earlier = {a.actor_id for cls in ("TrainController", "RayTrainWorker") for a in _alive(cls)}

    def this_runs(class_name: str):
        return [a for a in _alive(class_name) if a.actor_id not in earlier]

    thread = threading.Thread(target=fit)
    thread.start()
    _wait_for(lambda: len(this_runs("RayTrainWorker")) == 2, 180, "the run's two training workers")
    assert ray_session.available_resources().get("CPU", 0) == 0  # the run's group holds both CPUs
    assert not _alive("PlacementGroupCleaner")  # no cleaner process was started for this run
    assert not _alive("DatasetManager")  # nor a manager of Ray Datasets it does not have
    # nor an AutoscalingCoordinator (the test session's cluster runs every fit through lean_trainer: none ever starts)
    assert not _alive("_AutoscalingCoordinatorActor")
    # the controller records its group once the worker group has started
    _wait_for(lambda: os.path.exists(outcome["record_file"]), 60, "the controller's record of its group")

    (controller,) = _wait_for(lambda: this_runs("TrainController"), 60, "the run's Train controller")
    # the workers have torch loaded (they set up the process group with it); the controller does not
    workers = [w.pid for w in this_runs("RayTrainWorker")]
    _wait_for(lambda: all(_loads_torch(pid) for pid in workers), 120, "torch in the training workers")
    assert not _loads_torch(controller.pid), "the Train controller imported torch"
    os.kill(controller.pid, signal.SIGKILL)  # dies without removing its placement group
    thread.join(120)
    assert not thread.is_alive() and "error" in outcome

    # Without the driver's clean-up the group would hold both CPUs for as long as the driver lives.
    _wait_for(lambda: ray_session.available_resources().get("CPU", 0) == cpus, 60, "the CPUs to be free again")
    assert "removed 1 placement group(s)" in capsys.readouterr().err
    assert not os.path.exists(outcome["record_file"])


def test_without_a_record_nothing_is_removed(tmp_path):
    assert lean_trainer.remove_recorded(str(tmp_path / "missing.txt")) == []
