"""The slots of a search: at most `n` of its trials train at once, each in a slot with what the search's driver lent
it. A Ray actor the driver keeps for its next search (`SLOT_ACTORS`: a process start, ~1 CPU-s on 2 cores, a search
of one trial paid beside its run), opened for each search. This module imports Ray alone (not Ray Tune, not
forgetless's driver side): trial processes and Train controllers unpickle the actor's handle, and so import it. The
actor holds what it lends as object refs, which it never unpickles (unpickling an actor handle imports its class's
module: a ControllerHost's imports Ray Train, ~1.3 s on 2 cores).
"""
from __future__ import annotations

from typing import Any

import ray
from ray.exceptions import GetTimeoutError

from forgetless.platform.kept_actors import KeptActors


class TrialSlots:
    """At most `n` trials train at once (a Ray actor shared by the trials of one search).

    Tune's max_concurrent_trials only limits what the searcher suggests; trials a restored (resumed) search re-adds
    bypass it and would all start together, their Ray Train worker groups starving each other. A trial therefore
    holds a slot while it trains. Each slot has what the search's driver lent it (`lent`, one a slot, or none): a
    Train controller host (a ControllerHost actor) and a trial runner (trial_runner.TrialRunner), both the driver's, so
    they outlive a trial process Tune kills (the driver then aborts the trial's fit in the host:
    driver._release_slot). The actor also carries ASHA's stop requests to the trials' Ray Train runs."""

    def __init__(self):
        self.open(0)

    def open(self, n: int, lent: list[tuple[Any, Any]] | None = None) -> bool:
        """For a new search: `n` free slots, each with what is lent to it. True: the actor answers (and is idle)."""
        self.n = n
        self.holders: list[str | None] = [None] * n  # the trial holding each slot
        # each slot's (controller host, trial runner): object refs of the driver's actor handles (start_slots)
        self.lent = list(lent) if lent else [(None, None)] * n
        self.stopped: set[str] = set()
        return True

    def acquire(self, trial_id: str) -> bool:
        if trial_id in self.holders:
            return True
        if None not in self.holders:
            return False
        self.holders[self.holders.index(None)] = trial_id
        return True

    def lent_to(self, trial_id: str) -> tuple[Any, Any]:
        """(controller host, trial runner) of the slot `trial_id` holds, each an object ref of the actor's handle
        (`ray.get` it, or pass it to a remote call as an argument); (None, None) if it holds none, or the slot has
        none."""
        return self.lent[self.holders.index(trial_id)] if trial_id in self.holders else (None, None)

    def release(self, trial_id: str) -> None:
        if trial_id in self.holders:
            self.holders[self.holders.index(trial_id)] = None

    def request_stop(self, trial_id: str) -> None:
        """ASHA stopped this trial: its run aborts at its next report, then the trial frees its slot."""
        self.stopped.add(trial_id)

    def should_stop(self, trial_id: str) -> bool:
        return trial_id in self.stopped


SLOTS_ANSWER_S = 60.0  # how long a slots actor may take to answer (a new one starts a process first)
SLOTS_KEPT_ANSWER_S = 10.0  # how long a kept (idle) one may take


class SlotActors:
    """This driver's idle TrialSlots actors, by cluster and job: `lend` takes an idle one (or starts one, asking for no
    CPU), `take_back` keeps one that answers for the next search. Not detached: they end with the driver."""

    def __init__(self):
        self._kept = KeptActors()

    def lend(self) -> tuple[tuple, Any]:
        context = ray.get_runtime_context()
        key = (context.gcs_address, context.get_job_id())
        # (kept ones answer in milliseconds; one that does not is dropped)
        actor = self._kept.take(key, lambda a: a.open.remote(0), SLOTS_KEPT_ANSWER_S)
        return key, actor if actor is not None else ray.remote(num_cpus=0)(TrialSlots).remote()

    def take_back(self, key: tuple, actor) -> None:
        # emptied first: a trial of the search that ended may still ask
        self._kept.give_back(key, actor, lambda a: a.open.remote(0), SLOTS_ANSWER_S)


SLOT_ACTORS = SlotActors()  # this driver's

# The slots actors of the searches this driver runs now, by name: (pool key, actor, the ref of its `open` call).
_OPEN: dict[str, tuple[tuple, Any, Any]] = {}


def start_slots(name: str, n: int, lent: list[tuple[Any, Any]] | None = None) -> tuple[str, Any]:
    """Open a slots actor of this driver's for the search `name`, with what each slot is lent (`lent`:
    (ControllerHost, TrialRunner) actors this driver owns, or none): its name and handle. Trials get the handle (the
    search's trial context); the driver's Tune callbacks find it by name (`slots_actor`: a name, unlike a handle, stays
    valid in the callbacks a resumed search restores, since the resuming driver opens its slots under the same name).
    Each lent actor travels as an object ref (nested in a list, Ray passes it on unresolved): a process unpickles
    only the handles it calls (a trial: its runner's). `slots_opened` waits for the actor; `close_slots` gives it
    back."""
    slots_name = f"forgetless-slots-{name}"
    refs = [tuple(None if a is None else ray.put(a) for a in pair) for pair in lent] if lent else None
    key, actor = SLOT_ACTORS.lend()
    _OPEN[slots_name] = (key, actor, actor.open.remote(n, refs))  # (a new actor starts while the driver goes on)
    return slots_name, actor


def slots_opened(slots_name: str) -> None:
    """Wait (bounded) until the search's slots actor is open: before its trials ask it anything."""
    try:
        ray.get(_OPEN[slots_name][2], timeout=SLOTS_ANSWER_S)
    except GetTimeoutError:
        raise RuntimeError(f"the search's slots actor ({slots_name}) did not start in {SLOTS_ANSWER_S:.0f} s") from None


def close_slots(slots_name: str) -> None:
    """The search is over: its slots actor goes back to the driver's pool."""
    entry = _OPEN.pop(slots_name, None)
    if entry is not None:
        SLOT_ACTORS.take_back(entry[0], entry[1])


def slots_actor(slots):
    """The TrialSlots actor of `slots`: its handle (what trials and Train controllers are given), or the name its
    search's driver opened it under (what the driver's own Tune callbacks keep). ValueError: no search of this
    driver has that name open (it is over)."""
    if not isinstance(slots, str):
        return slots
    if slots not in _OPEN:
        raise ValueError(f"no open search slots named {slots}")
    return _OPEN[slots][1]
