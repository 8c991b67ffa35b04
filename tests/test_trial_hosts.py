"""A Tune search's trials are trained in the trial runner and Train controller host their search's driver lends each
trial slot (issue 31, item 4): the slot's trials, one after another, have their fits' controllers in the same process,
none of its own per fit; a trial process that dies mid-fit leaves its fit running (in the driver's runner and host),
and the driver aborts it in the host when Tune reports the trial ended (tuning/driver._release_slot), which frees the
run's CPUs and keeps the host for the slot's next trial.

Real embedded Ray. The trial processes are plain Ray actors that hold a slot as a Tune trial does
(trial.holding_a_slot), and the runner a stand-in for trial_runner.TrialRunner that fits a bare train function the
way it fits a trial (in `controllers_in(host, trial_id)`): a real search takes minutes on 2 cores
(tests/test_tune.py runs those, and checks that their fits start no controller of their own)."""
import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
from ray import cloudpickle
from ray._private import state as gcs_state
from ray.train import RunConfig, ScalingConfig, UserCallback

from forgetless._compat import PUBLIC_PATHS_VARIABLE
from forgetless.platform.driver import trainer as lean_trainer
from forgetless.platform.tuning import driver as search_driver
from forgetless.platform.tuning.slots import close_slots, start_slots
from forgetless.platform.tuning.trial import holding_a_slot
from conftest import load_repo_script


# The workers and the controller cannot import this test module: what they run travels by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ControllerPid(UserCallback):
    """Runs in the Train controller: writes the pid of the process it runs in."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        Path(self.path).write_text(str(os.getpid()))


def _report_once():
    import ray.train

    ray.train.report({"step": 1})


def _mark_and_sleep(marker: str):
    Path(marker).touch()
    time.sleep(120)


class _Runner:
    """Stands in for the slot's trial runner (a process of the driver's): fits as the trial, in the slot's host."""

    def ready(self, host=None, trial_id=None) -> bool:
        return True

    def fit(self, trial_id: str, host, train_fn, config, storage: str, pid_file: str) -> None:
        with lean_trainer.controllers_in(host, owner=trial_id):
            lean_trainer.fit(train_fn, embedded_cluster=True, started_it=False, train_loop_config=config,
                             scaling_config=ScalingConfig(num_workers=1),
                             run_config=RunConfig(name=trial_id, storage_path=storage,
                                                  callbacks=[ControllerPid(pid_file)]))


class _Trial:
    """Stands in for a Tune trial process: holds a slot of the search, and has the slot's runner train it."""

    def pid(self) -> int:
        return os.getpid()

    def fit(self, slots, trial_id: str, *args) -> bool:
        import ray

        with holding_a_slot(slots, trial_id) as (host, runner):
            if runner is None:
                return False
            ray.get(runner.fit.remote(trial_id, host, *args))
        return True


def _train_controllers_ever() -> int:
    return sum(a["ActorClassName"] == "TrainController" for a in gcs_state.actors().values())


def _wait_for(predicate, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"waited {seconds:.0f} s for {what}")


# slow tier (make test-all): four fits, ~60 s on a loaded 2-core machine; CI checks the trials' fits start no
# controller of their own through a real search (tests/test_tune.py)
@pytest.mark.slow
@pytest.mark.e2e
def test_a_slots_trials_share_the_drivers_controller_host_and_a_dead_trials_fit_is_aborted_there(
        ray_session, tmp_path, capsys):
    import ray

    assert lean_trainer.replaceable()
    cpus = ray_session.cluster_resources()["CPU"]
    lent = lean_trainer.CONTROLLER_HOSTS.lend(1)
    runner = ray.remote(num_cpus=0)(_Runner).remote()
    # the driver's callbacks know the search's slots actor by name, trial processes get its handle
    slots, handle = start_slots("test-hosts", 1, [(lent[0][1], runner)])
    controllers = _train_controllers_ever()
    try:
        # two trials of the slot, one after the other: their controllers run in one process, not in their own
        pids = []
        for trial_id in ("trial-a", "trial-b"):
            trial = ray.remote(num_cpus=0)(_Trial).remote()
            pid_file = tmp_path / f"{trial_id}.pid"
            assert ray.get(trial.fit.remote(handle, trial_id, _report_once, None, str(tmp_path / "runs"),
                                            str(pid_file)), timeout=120)
            pids.append((int(pid_file.read_text()), ray.get(trial.pid.remote())))
        (host_a, trial_a), (host_b, trial_b) = pids
        assert host_a == host_b and psutil.pid_exists(host_a)  # the slot's host, kept between the trials
        assert host_a not in (trial_a, trial_b, os.getpid())  # neither a trial's process nor the driver's
        assert _train_controllers_ever() == controllers  # no Train controller actor of its own for either fit

        # a trial process killed mid-fit: its fit goes on (the CPUs stay taken) until the driver aborts it in the
        # slot's host when Tune reports the trial ended; the host stays for the slot's next trial
        trial = ray.remote(num_cpus=0)(_Trial).remote()
        trial_pid = ray.get(trial.pid.remote(), timeout=60)
        marker = tmp_path / "training-entered"
        trial.fit.remote(handle, "trial-c", _mark_and_sleep, str(marker), str(tmp_path / "runs"),
                         str(tmp_path / "c.pid"))
        _wait_for(marker.exists, 120, "the trial's training to start")
        os.kill(trial_pid, signal.SIGKILL)
        _wait_for(lambda: not psutil.pid_exists(trial_pid), 30, "the trial process to end")
        time.sleep(1.0)
        assert ray_session.available_resources().get("CPU", 0) == cpus - 1  # the run goes on without its trial
        assert not ray.get(lent[0][1].abort_fit.remote("another-trial"))  # only the dead trial's fit is aborted
        search_driver._release_slot(slots, "trial-c")  # what the search's Tune callback does for an ended trial
        assert "trial trial-c ended while its Ray Train run ran: the run was aborted" in capsys.readouterr().err
        _wait_for(lambda: ray_session.available_resources().get("CPU", 0) == cpus, 30, "the run's CPU to be free")
        assert psutil.pid_exists(host_a) and ray.get(lent[0][1].idle.remote())
        assert ray.get(runner.ready.remote(), timeout=30)  # the runner's fit ended (aborted): it answers again

        trial = ray.remote(num_cpus=0)(_Trial).remote()  # the slot is free again, and its host runs the next fit
        assert ray.get(trial.fit.remote(handle, "trial-d", _report_once, None, str(tmp_path / "runs"),
                                        str(tmp_path / "d.pid")), timeout=120)
        assert int((tmp_path / "d.pid").read_text()) == host_a
        assert _train_controllers_ever() == controllers
    finally:
        close_slots(slots)
        lean_trainer.CONTROLLER_HOSTS.take_back(lent)


@pytest.mark.e2e
def test_with_the_ray_train_seam_off_a_search_lends_its_trials_nothing(ray_session, monkeypatch):
    """FORGETLESS_PUBLIC_PATHS=1: each trial trains in its own process and its fit starts Ray Train's own controller,
    as before (the driver's hosts run only the seam's controller)."""
    monkeypatch.setenv(PUBLIC_PATHS_VARIABLE, "1")
    assert search_driver._lend(2) == ([], [])


def test_the_docs_show_the_trial_cost_as_its_json_says():
    bench = load_repo_script("benchmarks/trial_cost.py")
    if not bench.RESULT.exists():
        pytest.skip("the benchmark has not been run (python benchmarks/trial_cost.py)")
    block = bench.render(json.loads(bench.RESULT.read_text()), bench._before(), bench._several())
    assert block in bench.DOC.read_text(), "docs/tune.md differs from the benchmark's JSON: run trial_cost.py --docs"
