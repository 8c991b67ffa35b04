"""The trial runner's protocol (issue 31, item 4; tuning/trial_runner.py): a trial's training starts in the slot's
runner (by the search's driver as Tune adds the trial, or by the trial's own process), its per-epoch reports wait in the
runner until the trial's process takes them (`follow`), in order, and none is lost when the training ends before
anybody followed it; a second start is no second run; an error the training raised is raised to the follower; a
runner still training is not kept for the next search.

Real embedded Ray, real TrialRunner actors (threaded, as the driver starts them) and real report delivery from another
process (the Train controller's part, `ReportMailbox`, here in a plain actor). The training itself is a stand-in that
reports a few epochs: a real trial is a Ray Train run, minutes of a 2-core machine per search (tests/test_tune.py and
tests/test_public_paths.py run real searches, slow tier)."""
import sys
import time
from pathlib import Path

import pytest
import ray
from ray import cloudpickle
from ray.exceptions import RayTaskError

from forgetless.platform.tuning.trial_runner import RUNNER_CONCURRENCY, ReportMailbox, TrialRunner, TrialRunners

# The runner processes cannot import this test module: what they run travels by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.e2e


class _Controller:
    """Stands in for the trial's Ray Train controller: reports each epoch through the trial's `forward`."""

    def report_epochs(self, forward: ReportMailbox, epochs: int, pause_s: float) -> None:
        for epoch in range(1, epochs + 1):
            forward.after_report(None, [{"epoch": epoch}], None)
            time.sleep(pause_s)


class _Training:
    """Stands in for trial_training: the trial's 'run' is the controller's epoch reports, then its result. With
    `run_dir`, it writes the run's progress file as a Ray Train run's rank 0 does: its start record, then (once the
    file `go` exists in that folder, or at once without one) its first epoch's record."""

    @staticmethod
    def progress_uri(params, context, trial_id):
        return params.get("run_dir", "/nonexistent/forgetless-run")

    @staticmethod
    def train_trial(params, context, trial_id, forward, host):
        if params.get("run_dir"):
            run_dir = Path(params["run_dir"])
            _write_progress(run_dir, "-")
            deadline = time.time() + 60
            while params.get("wait_for_go") and not (run_dir / "go").exists() and time.time() < deadline:
                time.sleep(0.05)
            _write_progress(run_dir, "all")
        controller = ray.remote(num_cpus=0)(_Controller).remote()
        ray.get(controller.report_epochs.remote(forward, params["epochs"], params.get("pause_s", 0.0)))
        if params.get("fail"):
            raise ValueError(f"trial {trial_id} failed on purpose")
        if params.get("marker"):
            Path(params["marker"]).touch()  # (its result is handed to the runner right after)
        return {"final": params["epochs"]}


def _write_progress(run_dir: Path, phase: str) -> None:
    from forgetless.platform.worker.progress_file import progress_record, write_progress

    epoch = 0 if phase == "-" else 1
    write_progress(str(run_dir), progress_record("stand-in", 1, [1], phase, 0, 1, epoch, 2, epoch, None, None))


class _StandInRunner(TrialRunner):
    def __init__(self):
        super().__init__()
        self._training = _Training


def _runner():
    return ray.remote(num_cpus=0, max_concurrency=RUNNER_CONCURRENCY)(_StandInRunner).remote()


def _follow_to_the_end(runner, trial_id: str) -> tuple[list[dict], dict]:
    taken, reports = 0, []
    for _ in range(100):  # bounded: each follow waits at most 2 s
        step = ray.get(runner.follow.remote(trial_id, taken, 2.0), timeout=30)
        reports += step["reports"]
        taken += len(step["reports"])
        if step["done"]:
            return reports, step
    raise AssertionError(f"trial {trial_id} never ended")


def test_a_followed_trial_hands_over_every_report_in_order_and_its_result(ray_session):
    runner = _runner()
    assert ray.get(runner.start.remote({"epochs": 5, "pause_s": 0.2}, {}, "t1", None), timeout=60)
    # the trial's process starting it too (after the driver did) starts no second run
    assert not ray.get(runner.start.remote({"epochs": 5}, {}, "t1", None), timeout=30)
    assert not ray.get(runner.idle.remote(), timeout=30)  # training: not to be kept for another search
    reports, end = _follow_to_the_end(runner, "t1")
    assert [r["epoch"] for r in reports] == [1, 2, 3, 4, 5]
    assert end["final"] == {"final": 5}
    assert ray.get(runner.idle.remote(), timeout=30)
    # handed over, it is forgotten: following it again is an error, starting it again a new run
    with pytest.raises(RayTaskError, match="not training in this runner"):
        ray.get(runner.follow.remote("t1", 0, 0.1), timeout=30)


def test_a_trial_that_ended_before_its_process_came_is_handed_over_whole_and_not_run_again(ray_session, tmp_path):
    runner = _runner()
    marker = tmp_path / "returned"
    params = {"epochs": 3, "marker": str(marker)}
    assert ray.get(runner.start.remote(params, {}, "early", None), timeout=60)  # the driver's early start
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the stand-in training never returned"
    time.sleep(0.5)  # its result reaches the runner's record in milliseconds
    marker.unlink()
    # the trial's process comes now: its start is no new run, and it gets every report and the result
    assert not ray.get(runner.start.remote(params, {}, "early", None), timeout=30)
    reports, end = _follow_to_the_end(runner, "early")
    assert [r["epoch"] for r in reports] == [1, 2, 3] and end["final"] == {"final": 3}
    assert not marker.exists()  # trained once


def test_an_error_in_training_is_raised_to_the_follower(ray_session):
    runner = _runner()
    ray.get(runner.start.remote({"epochs": 2, "fail": True}, {}, "bad", None), timeout=60)
    with pytest.raises(RayTaskError, match="failed on purpose"):
        _follow_to_the_end(runner, "bad")
    assert ray.get(runner.idle.remote(), timeout=30)


def test_a_runner_still_training_is_ended_not_kept(ray_session):
    pool = TrialRunners(_StandInRunner)
    (key, busy), (_, idle) = pool.lend(2)
    ray.get([busy.ready.remote(), idle.ready.remote()], timeout=120)
    # a trial Tune never started a process for (its search is over): its training goes on in the runner
    ray.get(busy.start.remote({"epochs": 100, "pause_s": 0.5}, {}, "orphan", None), timeout=60)
    pool.take_back([(key, busy), (key, idle)])
    assert pool.lend(1)[0][1] == idle  # the idle one is kept for the next search
    assert _ended(lambda: busy.ready.remote())  # the busy one was ended


def _ended(call, within_s: float = 30.0) -> bool:
    """Does the actor behind `call` (a remote call on it) end within `within_s`? (ray.kill is asynchronous: a call
    made right after it may still be served.)"""
    deadline = time.time() + within_s
    while time.time() < deadline:
        try:
            ray.get(call(), timeout=within_s)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.2)
    return False


class _Trial:
    """What the search's scheduler and callback read and set of a Tune trial (ray.tune.experiment.Trial: its id,
    status and resolved config)."""

    def __init__(self, trial_id: str, params: dict, status: str = "PENDING"):
        self.trial_id, self.status, self.config = trial_id, status, params

    def set_status(self, status: str) -> None:
        self.status = status


class _TuneController:
    """What the scheduler reads of Tune's controller (its trials)."""

    def __init__(self, trials: list[_Trial]):
        self.trials = trials

    def get_trials(self) -> list[_Trial]:
        return self.trials


def test_the_driver_starts_a_pending_trial_in_a_free_slot_and_only_once(ray_session):
    from forgetless.platform.tuning import driver
    from forgetless.platform.tuning.early_start import EarlyStarts
    from forgetless.platform.tuning.slots import close_slots, start_slots

    runner = _runner()
    slots, actor = start_slots("test-early-start", 1, [(None, runner)])
    early = driver.EarlyStart(slots)
    pending = [_Trial("a", {"epochs": 2}), _Trial("b", {"epochs": 2}), _Trial("r", {"epochs": 2}, status="RUNNING")]
    early.on_step_begin(0, pending)  # a restored search's callback: no early starts registered, nothing starts
    assert ray.get(runner.idle.remote(), timeout=30)

    starts = driver.EARLY_STARTS[slots] = EarlyStarts(slots, {"search": "test"})
    try:
        early.on_step_begin(1, pending)
        early.on_step_begin(2, pending)  # the next step of Tune's loop: "a" is not started again
    finally:
        driver.EARLY_STARTS.pop(slots)
    assert starts.started == {"a"}  # one slot: "b" waits for it (its own process will ask), "r" runs already
    # the trial's process then finds its training under way, holding the slot the driver took for it
    assert not ray.get(runner.start.remote({"epochs": 2}, {}, "a", None), timeout=30)
    reports, end = _follow_to_the_end(runner, "a")
    assert [r["epoch"] for r in reports] == [1, 2] and end["final"] == {"final": 2}
    assert not ray.get(actor.acquire.remote("b"), timeout=30)  # the slot is "a"'s until its process releases it
    ray.get(actor.release.remote("a"), timeout=30)
    assert ray.get(actor.acquire.remote("b"), timeout=30)
    close_slots(slots)


def test_a_runs_start_up_is_past_once_its_first_epoch_ended_or_it_ended(ray_session, tmp_path):
    runner = _runner()
    run_dir = tmp_path / "run"
    _write_progress(run_dir, "all")  # left by an earlier invocation of the run: not where this one stands
    time.sleep(0.05)
    assert ray.get(runner.start.remote({"epochs": 1, "run_dir": str(run_dir), "wait_for_go": True}, {}, "t", None),
                   timeout=60)
    assert not ray.get(runner.past_startup.remote("t", 0.5), timeout=30)  # workers up (start record), no epoch yet
    (run_dir / "go").touch()
    assert ray.get(runner.past_startup.remote("t", 20.0), timeout=30)
    _follow_to_the_end(runner, "t")
    assert ray.get(runner.past_startup.remote("t", 0.0), timeout=30)  # not training here: nothing to wait for
    # a run that ends before any epoch (it failed while starting) is past its start-up too
    ray.get(runner.start.remote({"epochs": 0, "fail": True}, {}, "bad", None), timeout=60)
    assert ray.get(runner.past_startup.remote("bad", 20.0), timeout=30)


def _as_its_process(runner, trial: _Trial) -> None:
    """What the trial's process does (trial.follow_in_runner): start it (no second run if the driver's start, not
    waited on, came first: a threaded actor may serve the two in either order), then follow it to its end."""
    ray.get(runner.start.remote(trial.config, {}, trial.trial_id, None), timeout=30)
    _follow_to_the_end(runner, trial.trial_id)


def test_the_first_trials_process_waits_until_its_run_is_past_its_start_up(ray_session, tmp_path, monkeypatch):
    """The search's scheduler (early_start.StartsTrainingFirst, as Tune calls it) starts a trial's training as Tune
    adds it, keeps the trial PAUSED (no process) until its run's first epoch has ended, then hands it to Tune; once
    a trial has ended, the next ones are not held (the ended trial's process serves them)."""
    from forgetless.platform.tuning import early_start
    from forgetless.platform.tuning.early_start import EARLY_STARTS, EarlyStarts, StartsTrainingFirst
    from forgetless.platform.tuning.slots import close_slots, start_slots

    runner = _runner()
    slots, actor = start_slots("test-hold", 1, [(None, runner)])
    scheduler = StartsTrainingFirst(slots)
    a = _Trial("a", {"epochs": 1, "run_dir": str(tmp_path / "a"), "wait_for_go": True})
    tune_controller = _TuneController([a])
    scheduler.on_trial_add(tune_controller, a)  # a restored search: nothing registered, Tune starts its process
    assert a.status == "PENDING" and ray.get(runner.idle.remote(), timeout=30)

    EARLY_STARTS[slots] = EarlyStarts(slots, {"search": "test"})
    a2 = _Trial("a2", a.config)
    tune_controller.trials = [a2]
    try:
        scheduler.on_trial_add(tune_controller, a2)
        assert a2.status == "PAUSED"  # no process
        assert ray.get(EARLY_STARTS[slots].held["a2"].started, timeout=30)  # (the start, not waited on by Tune's loop)
        assert not ray.get(runner.idle.remote(), timeout=30)  # training
        t0 = time.monotonic()
        assert scheduler.choose_trial_to_run(tune_controller) is None
        assert time.monotonic() - t0 >= early_start.HELD_WAIT_S  # waited (Tune's loop would spin), bounded
        (tmp_path / "a" / "go").touch()
        chosen, deadline = None, time.time() + 30
        while chosen is None and time.time() < deadline:
            chosen = scheduler.choose_trial_to_run(tune_controller)
        assert chosen is a2 and a2.trial_id not in EARLY_STARTS[slots].held
        _follow_to_the_end(runner, "a2")
        ray.get(actor.release.remote("a2"), timeout=30)  # (its process, as it returns)
        a2.status = "TERMINATED"
        scheduler.on_trial_complete(tune_controller, a2, {})
        b = _Trial("b", {"epochs": 1})
        tune_controller.trials.append(b)
        scheduler.on_trial_add(tune_controller, b)  # started, not held: a2's process serves it
        assert b.status == "PENDING" and scheduler.choose_trial_to_run(tune_controller) is b
        _as_its_process(runner, b)
        ray.get(actor.release.remote("b"), timeout=30)

        # a run that never gets past its start-up holds its trial HOLD_MAX_S at most
        EARLY_STARTS[slots] = EarlyStarts(slots, {"search": "test"})
        monkeypatch.setattr(early_start, "HOLD_MAX_S", 1.0)
        c = _Trial("c", {"epochs": 1, "run_dir": str(tmp_path / "c"), "wait_for_go": True})
        tune_controller.trials = [c]
        scheduler.on_trial_add(tune_controller, c)
        assert c.status == "PAUSED"
        chosen, deadline = None, time.time() + 30
        while chosen is None and time.time() < deadline:
            chosen = scheduler.choose_trial_to_run(tune_controller)
        assert chosen is c
        (tmp_path / "c" / "go").touch()
        _as_its_process(runner, c)
    finally:
        EARLY_STARTS.pop(slots, None)
        close_slots(slots)


def test_a_drivers_slots_actor_serves_its_next_search_from_scratch(ray_session):
    from forgetless.platform.tuning.slots import close_slots, slots_actor, slots_opened, start_slots

    first, actor = start_slots("test-first", 1)
    slots_opened(first)
    assert ray.get(actor.acquire.remote("x"), timeout=30) and not ray.get(actor.acquire.remote("y"), timeout=30)
    ray.get(actor.request_stop.remote("x"), timeout=30)
    close_slots(first)
    with pytest.raises(ValueError, match="no open search slots"):  # the driver's callbacks: the search is over
        slots_actor(first)
    second, again = start_slots("test-second", 2)
    slots_opened(second)
    assert again == actor  # the same process, kept by the driver: no actor start for the second search
    assert slots_actor(second) == actor
    # opened afresh: two free slots, no stop request of the search before
    assert ray.get(actor.acquire.remote("x"), timeout=30) and ray.get(actor.acquire.remote("y"), timeout=30)
    assert not ray.get(actor.should_stop.remote("x"), timeout=30)
    close_slots(second)


class _Answers:
    def ping(self) -> bool:
        return True


def test_a_kept_actor_that_no_longer_answers_is_ended_not_lent(ray_session):
    """The keeping the driver's three pools share (kept_actors.KeptActors: controller hosts, trial runners, slots
    actors): a kept actor that no longer answers is ended and the next one is taken; `give_back` ends what is not
    idle."""
    from forgetless.platform.kept_actors import KeptActors

    kept, key = KeptActors(), ("cluster", "job")
    alive, dead = (ray.remote(num_cpus=0)(_Answers).remote() for _ in range(2))
    ray.get([alive.ping.remote(), dead.ping.remote()], timeout=120)
    kept.keep(key, alive)
    kept.keep(key, dead)  # the last kept is taken first
    ray.kill(dead)
    assert _ended(lambda: dead.ping.remote())
    dropped = []
    assert kept.take(key, lambda a: a.ping.remote(), 30.0, dropped.append) == alive
    assert len(dropped) == 1 and kept.take(key) is None
    assert kept.take(("another", "job")) is None
    assert kept.give_back(key, alive, lambda a: a.ping.remote(), 30.0) and kept.take(key) == alive  # idle: kept
    assert not kept.give_back(key, alive, lambda a: ray.put(False), 30.0)  # (its owner says it is busy)
    assert _ended(lambda: alive.ping.remote())  # not idle: ended
