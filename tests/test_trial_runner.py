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
    """Stands in for trial_training: the trial's 'run' is the controller's epoch reports, then its result."""

    @staticmethod
    def train_trial(params, context, trial_id, forward, host):
        controller = ray.remote(num_cpus=0)(_Controller).remote()
        ray.get(controller.report_epochs.remote(forward, params["epochs"], params.get("pause_s", 0.0)))
        if params.get("fail"):
            raise ValueError(f"trial {trial_id} failed on purpose")
        if params.get("marker"):
            Path(params["marker"]).touch()  # (its result is handed to the runner right after)
        return {"final": params["epochs"]}


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


class _PendingTrial:
    """What EarlyStart reads of a Tune trial (ray.tune.experiment.Trial: its id, status and resolved config)."""

    PENDING, RUNNING = "PENDING", "RUNNING"

    def __init__(self, trial_id: str, epochs: int, status: str = "PENDING"):
        self.trial_id, self.status, self.config = trial_id, status, {"epochs": epochs}


def test_the_driver_starts_a_pending_trial_in_a_free_slot_and_only_once(ray_session):
    from forgetless.platform.tuning import driver
    from forgetless.platform.tuning.slots import close_slots, start_slots

    runner = _runner()
    slots, actor = start_slots("test-early-start", 1, [(None, runner)])
    early = driver.EarlyStart(slots)
    pending = [_PendingTrial("a", 2), _PendingTrial("b", 2), _PendingTrial("r", 2, status="RUNNING")]
    early.on_step_begin(0, pending)  # a restored search's callback: no context registered, nothing starts
    assert early.started == set() and ray.get(runner.idle.remote(), timeout=30)

    driver._EARLY_START[slots] = {"search": "test"}
    try:
        early.on_step_begin(1, pending)
        early.on_step_begin(2, pending)  # the next step of Tune's loop: "a" is not started again
    finally:
        driver._EARLY_START.pop(slots)
    assert early.started == {"a"}  # one slot: "b" waits for it (its own process will ask), "r" runs already
    # the trial's process then finds its training under way, holding the slot the driver took for it
    assert not ray.get(runner.start.remote({"epochs": 2}, {}, "a", None), timeout=30)
    reports, end = _follow_to_the_end(runner, "a")
    assert [r["epoch"] for r in reports] == [1, 2] and end["final"] == {"final": 2}
    assert not ray.get(actor.acquire.remote("b"), timeout=30)  # the slot is "a"'s until its process releases it
    ray.get(actor.release.remote("a"), timeout=30)
    assert ray.get(actor.acquire.remote("b"), timeout=30)
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
