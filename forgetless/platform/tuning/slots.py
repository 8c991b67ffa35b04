"""The slots of a search: at most `n` of its trials train at once, each in a slot with what the search's driver lent
it. A Ray actor per search, started as the search starts, whose start is on the way to the search's first trial: this
module imports Ray alone (not Ray Tune, not forgetless's driver side), and the actor holds what it lends as object
refs, which it never unpickles (unpickling an actor handle imports its class's module: a ControllerHost's imports Ray
Train, ~1.3 s on 2 cores).
"""
from __future__ import annotations

from typing import Any

import ray


class TrialSlots:
    """At most `n` trials train at once (a Ray actor shared by the trials of one search).

    Tune's max_concurrent_trials only limits what the searcher suggests; trials a restored (resumed) search re-adds
    bypass it and would all start together, their Ray Train worker groups starving each other. A trial therefore
    holds a slot while it trains. Each slot has what the search's driver lent it (`lent`, one a slot, or none): a
    Train controller host (a ControllerHost actor) and a trial runner (trial_runner.TrialRunner), both the driver's, so
    they outlive a trial process Tune kills (the driver then aborts the trial's fit in the host:
    driver._release_slot). The actor also carries ASHA's stop requests to the trials' Ray Train runs."""

    def __init__(self, n: int, lent: list[tuple[Any, Any]] | None = None):
        self.n = n
        self.holders: list[str | None] = [None] * n  # the trial holding each slot
        # each slot's (controller host, trial runner): object refs of the driver's actor handles (start_slots)
        self.lent = list(lent) if lent else [(None, None)] * n
        self.stopped: set[str] = set()

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


def start_slots(name: str, n: int, lent: list[tuple[Any, Any]] | None = None):
    """Start the search's TrialSlots actor, with what each slot is lent (`lent`: (ControllerHost, TrialRunner) actors
    this driver owns, or none). Trials and the driver's callback find it by name (a name, unlike an actor handle, stays
    valid in the callbacks a resumed search restores); the driver keeps the handle, which keeps the actor alive.
    Each lent actor travels as an object ref (nested in a list, Ray passes it on unresolved): a process unpickles
    only the handles it calls (a trial: its runner's)."""
    actor_name = f"forgetless-slots-{name}"
    refs = [tuple(None if a is None else ray.put(a) for a in pair) for pair in lent] if lent else None
    return actor_name, ray.remote(num_cpus=0)(TrialSlots).options(name=actor_name, get_if_exists=True).remote(
        n, refs)


