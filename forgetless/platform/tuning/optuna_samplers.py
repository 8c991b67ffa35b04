"""Optuna samplers Ray Tune can save and restore (imported only by optuna searches: optuna is an optional extra).

Tune pickles its searcher with the experiment's state (that is what `--resume` restores). Optuna's NSGA-II sampler
holds a threading lock, which cannot be pickled: this one drops the lock when pickled and makes a new one when
unpickled (the lock only guards its per-process generation cache).
"""
from __future__ import annotations

import threading

from optuna.samplers import NSGAIISampler


class ResumableNSGAIISampler(NSGAIISampler):
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()
