"""The driver's trial runners: a `TrialRunner` is a process of the search's driver lent to one trial slot
(tuning/trial.py). Started with the search, it imports forgetless's driver side once (tuning/trial_training.py:
torch, DeepSpeed's config, MLflow: ~5-15 s on 2 cores) and trains the slot's trials one after another, as the driver
itself runs a `compare`'s runs; `TRIAL_RUNNERS` keeps the driver's idle runners for its next search.

A trial's training starts with `start` (by the search's driver as soon as Tune adds the trial, or by the trial's own
process, whichever comes first: early_start.py), and its per-epoch reports wait in the runner until the trial's
Tune process takes them (`follow`) and reports them to Tune itself. So the run's start does not wait for Tune to
start the trial's process (~2 s on 2 cores), and no trial starts a report-queue actor (a process) of its own, as
Ray's TuneReportCallback does.

This module is light on purpose (Ray, and forgetless's storage helpers): every process that receives a runner's actor
handle imports the module of its class to unpickle the handle (a Tune trial process, the search's slots actor), and
importing the driver side there cost ~2.5 s on the way to each trial's first step (docs/tune.md, "A trial's fixed
cost").
"""
from __future__ import annotations

import threading
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from forgetless import storage
from forgetless.platform.kept_actors import KeptActors
from forgetless.platform.worker.progress_file import after_startup, read_progress

HOST_ANSWER_S = 120.0  # how long the slot's Train controller host may take to answer `ready`
PROGRESS_POLL_S = 0.1  # how often `past_startup` reads a run's progress file (local or shared disk)
PROGRESS_POLL_S_S3 = 1.0  # (on S3: a GET per look)
RUNNER_CONCURRENCY = 8  # calls a runner serves at once: a trial trains in a thread while reports and follows come in


class ReportMailbox:
    """A trial's per-epoch reports, sent from its Ray Train controller (objective_report.ObjectiveReport's `forward`) to
    its runner, where they wait for the trial's process (`TrialRunner.follow`). Each is delivered before the controller
    goes on (a few milliseconds an epoch), so a run that has returned has delivered them all, in order."""

    def __init__(self, runner, trial_id: str):
        self.runner = runner
        self.trial_id = trial_id

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        m = dict(metrics[0])
        if checkpoint:  # as Ray's TuneReportCallback does
            m["checkpoint_path"] = checkpoint.path
        ray.get(self.runner.deliver.remote(self.trial_id, m), timeout=HOST_ANSWER_S)


class _TrialRun:
    """One trial's training in a runner: its reports, and how it ended."""

    def __init__(self, params: dict[str, Any] | None = None, context: dict[str, Any] | None = None):
        self.started_at = time.time()
        self.params, self.context = params, context  # (what its run's progress file is found from)
        self.progress_uri: str | None = None  # its Ray Train run's progress file (worker/progress_file.py)
        self.reports: list[dict] = []
        self.done = False
        self.final: dict[str, float] | None = None
        self.error: BaseException | None = None
        self.followed = False  # a trial process has asked for its reports


class TrialRunner:
    """A process of the search's driver that trains the trials of one slot, one after another (`train_trial`, in a
    thread of its own per trial), and keeps each trial's reports until the trial's process takes them."""

    def __init__(self):
        # the driver side, imported as the runner starts (with the search), not on its first trial's way
        from forgetless.platform.tuning import trial_training

        self._training = trial_training
        self._runs: dict[str, _TrialRun] = {}
        self._changed = threading.Condition()

    def ready(self, host=None, trial_id: str | None = None) -> bool:
        """Started (and its imports done); with `host`, the slot's Train controller host answers too, unless the
        trial `trial_id` trains here already (its controller runs in the host, and may keep it from answering while
        it starts the run's workers)."""
        with self._changed:
            if trial_id in self._runs:
                return True
        if host is not None:
            ray.get(host.ready.remote(), timeout=HOST_ANSWER_S)
        return True

    def idle(self) -> bool:
        """No trial trains here; trials that ended and were never handed over are forgotten (their search is over:
        the driver asks as it takes the runner back)."""
        with self._changed:
            if any(not r.done for r in self._runs.values()):
                return False
            self._runs.clear()
            return True

    def start(self, params: dict[str, Any], context: dict[str, Any], trial_id: str, host) -> bool:
        """Start training the trial, unless it is here already: training, or ended with nobody having followed it
        yet (the driver started it early, and it ended before the trial's process came: it is handed over, not run
        again). A trial whose follower went away (Tune ended its process) and that has ended since is run again (its
        run resumes from its last checkpoint). True if this call started it."""
        with self._changed:
            run = self._runs.get(trial_id)
            if run is not None and not (run.done and run.followed):
                return False
            self._runs[trial_id] = run = _TrialRun(params, context)
        me = ray.get_runtime_context().current_actor
        threading.Thread(target=self._train, args=(run, params, context, trial_id, host, me), daemon=True,
                         name=f"trial-{trial_id}").start()
        return True

    def _train(self, run: _TrialRun, params, context, trial_id: str, host, me) -> None:
        final, error = None, None
        try:
            final = self._training.train_trial(params, context, trial_id, ReportMailbox(me, trial_id), host)
        except BaseException as e:  # raised to the trial's process by `follow`, and so in Tune
            error = e
        with self._changed:
            run.final, run.error, run.done = final, error, True
            self._changed.notify_all()

    def past_startup(self, trial_id: str, wait_s: float, started: Any = None) -> bool:
        """Is the trial's run past its start-up: has its first epoch ended (its progress file says so, written since
        this start), or has its training ended? Waits up to `wait_s` for it; True for a trial not training here
        (nothing to wait for). The search's driver asks before Tune starts the trial's process (early_start.py),
        passing its `start` call's result as `started`: Ray then runs this call after that one (the calls of a
        threaded actor may run in any order)."""
        with self._changed:
            run = self._runs.get(trial_id)
        if run is None:
            return True
        if run.progress_uri is None:
            run.progress_uri = self._training.progress_uri(run.params, run.context, trial_id)
        poll_s = PROGRESS_POLL_S_S3 if storage.is_s3(run.progress_uri) else PROGRESS_POLL_S
        deadline = time.monotonic() + wait_s
        while True:
            record = read_progress(run.progress_uri, since=run.started_at)
            if run.done or (record is not None and after_startup(record)):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._changed:
                self._changed.wait_for(lambda: run.done, timeout=min(left, poll_s))

    def deliver(self, trial_id: str, metrics: dict) -> None:
        with self._changed:
            run = self._runs.get(trial_id)
            if run is not None:
                run.reports.append(metrics)
                self._changed.notify_all()

    def follow(self, trial_id: str, taken: int, wait_s: float) -> dict[str, Any]:
        """The trial's reports after the first `taken`, in order (waiting up to `wait_s` for one, or the end), whether
        the training has ended (`done`) and its result (`final`); the error it raised is raised here. Once the end is
        handed over, with the last reports, the trial is forgotten here."""
        with self._changed:
            run = self._runs.get(trial_id)
            if run is None:
                raise RuntimeError(f"trial {trial_id} is not training in this runner (start it first)")
            run.followed = True
            self._changed.wait_for(lambda: len(run.reports) > taken or run.done, timeout=wait_s)
            if run.done:
                del self._runs[trial_id]
                if run.error is not None:
                    raise run.error
            return {"reports": run.reports[taken:], "done": run.done, "final": run.final}


RUNNER_ANSWER_S = 10.0  # how long an idle runner may take to answer before it is ended and not kept


class TrialRunners:
    """This driver's idle TrialRunner actors, by cluster and job: `lend` takes idle ones (or starts new ones, on the
    driver's node, asking for no CPU: a runner only waits on its trial's Ray Train run), `take_back` keeps the idle
    ones for the driver's next search. Not detached: they end with the driver."""

    def __init__(self, runner_class: type = TrialRunner):
        self._runner_class = runner_class  # (tests start a TrialRunner with a stand-in training)
        self._kept = KeptActors()

    def lend(self, n: int) -> list:
        context = ray.get_runtime_context()
        key, node_id = (context.gcs_address, context.get_job_id()), context.get_node_id()
        taken = []
        while len(taken) < n and (runner := self._kept.take(key)) is not None:
            taken.append(runner)
        return [(key, r) for r in taken] + [
            (key, ray.remote(num_cpus=0, max_concurrency=RUNNER_CONCURRENCY,
                             scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))(
                self._runner_class).remote()) for _ in range(n - len(taken))]

    def take_back(self, lent: list) -> None:
        """Runners `lend` gave out: an idle one is kept for the next search; one still busy with a trial (whose Tune
        process never came, or died) is ended, a dead one dropped."""
        for key, runner in lent:
            self._kept.give_back(key, runner, lambda r: r.idle.remote(), RUNNER_ANSWER_S)


TRIAL_RUNNERS = TrialRunners()  # this driver's
