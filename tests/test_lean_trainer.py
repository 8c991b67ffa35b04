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
from pathlib import Path

import psutil
import pytest
from ray import cloudpickle
from ray.train import RunConfig, ScalingConfig
from ray._private import state as gcs_state

from forgetless._compat import PUBLIC_PATHS_VARIABLE
from forgetless.platform.driver import trainer as lean_trainer

from forgetless.platform.driver import ray_cluster

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
    assert ray_cluster._EMBEDDED_CLUSTER and lean_trainer.replaceable()
    cpus = ray_session.cluster_resources()["CPU"]
    outcome = {}

    def fit():
        try:
            with lean_trainer.cleaned_after_the_fit() as record_file:
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
    _wait_for(lambda: Path(outcome["record_file"]).read_text().strip(), 60, "the controller's record of its group")

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


def _mark_and_sleep_in_training(marker: str):
    Path(marker).touch()
    time.sleep(120)


def _report_and_wait_for_the_commit():
    """Rank 0 reports a checkpoint; every rank waits until Ray Train's controller has committed it (the call travels
    to the controller actor, here the controller host); the workers got the cluster's variables from the raylet."""
    _report_a_checkpoint()
    # the cluster's variables reach the worker from its raylet, not as a runtime_env of its own (which would start
    # it through Ray's setup_worker.py)
    import ray

    assert not ray.get_runtime_context().runtime_env.get("env_vars"), ray.get_runtime_context().runtime_env
    assert os.environ["FORGETLESS_EMBEDDED_CLUSTER"] == "1" and os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]


def _report_a_checkpoint():
    """Rank 0 reports a checkpoint; every rank waits until Ray Train's controller has committed it."""
    import tempfile

    import ray.train
    from ray.train import Checkpoint

    from forgetless.platform.worker.checkpoints import wait_until_committed

    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "weights.txt").write_text("1")
        rank = ray.train.get_context().get_world_rank()
        ray.train.report({"step": 1}, checkpoint=Checkpoint.from_directory(folder) if rank == 0 else None,
                         checkpoint_dir_name="only")
    if not wait_until_committed("only", timeout_s=60):
        raise AssertionError("the checkpoint was not committed")


def test_a_drivers_fits_run_their_controllers_in_one_kept_process(ray_session, tmp_path, capsys):
    """On an embedded cluster the driver keeps its Train controller's process for the next fit; a fit whose controller
    process dies ends with an error, its placement group is removed, and the next fit starts a new process."""
    cpus = ray_session.cluster_resources()["CPU"]
    config = dict(scaling_config=ScalingConfig(num_workers=2))
    outcome = {}

    marker = tmp_path / "training-entered"

    def fit_that_sleeps():
        try:
            lean_trainer.fit(_mark_and_sleep_in_training, embedded_cluster=True, train_loop_config=str(marker),
                             run_config=RunConfig(name="killed-host", storage_path=str(tmp_path)), **config)
        except Exception as e:
            outcome["error"] = e

    thread = threading.Thread(target=fit_that_sleeps)
    thread.start()
    # the train function runs once the worker group has started (and the controller has recorded its group)
    _wait_for(marker.exists, 180, "the run's training to start")
    assert not _alive("TrainController")  # the controller runs in a host process, not an actor of its own
    for host in _alive("ControllerHost"):  # the running fit's host (an idle one of an earlier test's fits is
        os.kill(host.pid, signal.SIGKILL)  # replaced the same way when the pool finds it dead)
    thread.join(120)
    assert not thread.is_alive() and "error" in outcome
    _wait_for(lambda: ray_session.available_resources().get("CPU", 0) == cpus, 60, "the CPUs to be free again")
    assert "removed 1 placement group(s)" in capsys.readouterr().err

    hosts = []
    for name in ("first", "second"):
        handler = signal.getsignal(signal.SIGINT)
        result = lean_trainer.fit(_report_and_wait_for_the_commit, embedded_cluster=True,
                                  run_config=RunConfig(name=name, storage_path=str(tmp_path)), **config)
        assert result.error is None and Path(result.checkpoint.path).name == "only"
        assert signal.getsignal(signal.SIGINT) is handler  # Ray Train's own SIGINT handler is gone again
        hosts.append({a.pid for a in _alive("ControllerHost") if psutil.pid_exists(a.pid)})
    assert "RAY_ADDRESS" not in os.environ  # the driver's environment is its own again after the cluster's start
    # one new process after the kill, the same one for both fits
    assert len(hosts[0]) == 1 and hosts[0] == hosts[1]
    assert not _alive("TrainController")


class _TrialProcess:
    """Stands in for a Ray Tune trial process: a process inside the embedded cluster that runs a fit (not its driver)."""

    def pid(self) -> int:
        return os.getpid()

    def fit(self, marker: str, storage: str) -> None:
        lean_trainer.fit(_mark_and_sleep_in_training, embedded_cluster=True, started_it=False,
                         train_loop_config=marker, scaling_config=ScalingConfig(num_workers=2),
                         run_config=RunConfig(name="trial-killed", storage_path=storage))


def test_the_driver_removes_the_group_of_a_fit_whose_calling_process_died(ray_session, tmp_path, capsys):
    """A fit called from a process inside the embedded cluster (a Tune trial's) records its placement group in the
    cluster's session folder and starts no PlacementGroupCleaner; if that process is killed mid-fit (its controller
    dies with it), the driver removes the group."""
    import ray

    cpus = ray_session.cluster_resources()["CPU"]
    cleaners = {a.actor_id for a in _alive("PlacementGroupCleaner")}
    trial = ray.remote(num_cpus=0)(_TrialProcess).remote()
    pid = ray.get(trial.pid.remote(), timeout=60)
    marker = tmp_path / "training-entered"
    trial.fit.remote(str(marker), str(tmp_path / "runs"))
    _wait_for(marker.exists, 180, "the trial's training to start")
    records = [p for p in lean_trainer.record_folder().glob(f"{pid}@*.txt") if p.read_text().strip()]
    assert len(records) == 1  # the controller recorded its workers' group, in a file named after the trial process
    assert {a.actor_id for a in _alive("PlacementGroupCleaner")} == cleaners  # no cleaner process for this fit
    assert ray_session.available_resources().get("CPU", 0) == 0

    os.kill(pid, signal.SIGKILL)  # the trial process dies; its controller and workers go with it, the group stays
    _wait_for(lambda: not psutil.pid_exists(pid), 30, "the trial process to end")
    time.sleep(2)
    assert ray_session.available_resources().get("CPU", 0) == 0  # nothing else would ever free these CPUs
    removed = lean_trainer.remove_groups_of_dead_processes()
    assert len(removed) == 1 and not records[0].exists()
    _wait_for(lambda: ray_session.available_resources().get("CPU", 0) == cpus, 60, "the CPUs to be free again")
    assert "removed 1 placement group(s)" in capsys.readouterr().err
    assert lean_trainer.remove_groups_of_dead_processes() == []  # nothing twice


def _train_controllers_ever() -> int:
    return sum(a["ActorClassName"] == "TrainController" for a in gcs_state.actors().values())


# slow tier (make test-all): CI's 15-minute budget (docs/performance.md); run and reported in the stop's closing note
@pytest.mark.slow
def test_with_the_ray_train_seam_off_a_fit_is_rays_own(ray_session, tmp_path, monkeypatch):
    """FORGETLESS_PUBLIC_PATHS=1 (or another Ray): `fit` runs Ray's TorchTrainer unchanged, whose controller is an
    actor of its own, and gives the same result; the caller's SIGINT handler is put back."""
    monkeypatch.setenv(PUBLIC_PATHS_VARIABLE, "1")
    assert not lean_trainer.replaceable()
    handler, controllers = signal.getsignal(signal.SIGINT), _train_controllers_ever()
    result = lean_trainer.fit(_report_a_checkpoint, embedded_cluster=True,
                              run_config=RunConfig(name="public", storage_path=str(tmp_path)),
                              scaling_config=ScalingConfig(num_workers=2))
    assert result.error is None and Path(result.checkpoint.path).name == "only"
    assert _train_controllers_ever() == controllers + 1  # Ray's own controller actor, not a kept host
    assert signal.getsignal(signal.SIGINT) is handler
