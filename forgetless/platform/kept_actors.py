"""Actors a driver keeps between uses (its Train controller hosts, trial runners and search slots actors), by key:
the cluster and job they belong to, and whatever else makes one fit a use. Not detached: they end with the driver.

This module imports Ray alone: the modules of the search's light actors use it (tuning/slots.py, trial_runner.py).
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError


class KeptActors:
    """Idle actors by key. `take` one (checked, where asked, that it still answers; one that does not is ended),
    `give_back` one that its owner says is idle (else it is ended)."""

    def __init__(self):
        self._idle: dict[tuple, list] = {}
        self._lock = threading.Lock()

    def take(self, key: tuple, answers: Callable[[Any], Any] | None = None, timeout_s: float = 10.0,
             dropped: Callable[[Exception], None] | None = None):
        """An idle actor kept under `key`, or None. With `answers` (an actor -> the object ref of a call it must
        answer within `timeout_s`), one that does not is ended (`dropped` is told why) and the next is tried."""
        while True:
            with self._lock:
                idle = self._idle.get(key, [])
                actor = idle.pop() if idle else None
            if actor is None or answers is None:
                return actor
            try:
                ray.get(answers(actor), timeout=timeout_s)
                return actor
            except (RayActorError, GetTimeoutError) as e:
                if dropped is not None:
                    dropped(e)
                ray.kill(actor)

    def keep(self, key: tuple, actor) -> None:
        with self._lock:
            self._idle.setdefault(key, []).append(actor)

    def give_back(self, key: tuple, actor, idle: Callable[[Any], Any], timeout_s: float) -> bool:
        """Keep `actor` if it answers `idle` (an actor -> the object ref of a call returning whether it is idle)
        truthfully within `timeout_s`; else end it. True if kept."""
        try:
            kept = bool(ray.get(idle(actor), timeout=timeout_s))
        except (RayActorError, GetTimeoutError):
            kept = False
        if kept:
            self.keep(key, actor)
        else:
            ray.kill(actor)
        return kept
