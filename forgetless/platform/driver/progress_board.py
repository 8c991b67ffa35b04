"""Live progress of the driver's running Ray Train runs: one line per run with phase, epoch, step, target and source
accuracy, elapsed time and ETA.

World rank 0 of each run writes `progress.json` into the run's storage folder (local or s3://) when it starts, at
every epoch's end and when it finishes; the driver reads those files (every second; every 5 s on S3) and shows them:
on a terminal a live table (rich) that redraws in place; elsewhere (CI, `ray job` logs, a file) a line whenever a run
moved on. Storage is the one channel that reaches the driver from every node, and the driver already watches it.
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, Iterator

from forgetless import console, storage

from forgetless.platform.worker.progress_file import read_progress


@dataclass
class _Watched:
    label: str
    run_uri: str
    started: float
    record: dict[str, Any] | None = None
    shown: tuple | None = None  # what the last printed line showed (plain mode prints changes only)


def format_line(label: str, record: dict[str, Any] | None, elapsed: float) -> str:
    """One run's line: `finetune  stage 1/1 all epoch 3/8 step 120  target 91.2%  source 88.0%  12s  ETA 20s`."""
    if record is None:
        return f"{label}  starting Ray Train workers  {elapsed:.0f}s"
    acc = lambda name, v: f"{name} {100 * v:.1f}%" if v is not None else f"{name} -"  # noqa: E731
    if record["phase"] == "-" and not record.get("finished"):  # workers up, no epoch ended yet
        return (f"{label}  stage {record['stage_position']}/{record['stages']} training from step {record['step']}  "
                f"{elapsed:.0f}s")
    done = record.get("done") or 0.0
    eta = "done" if record.get("finished") else (f"ETA {elapsed * (1 - done) / done:.0f}s" if done > 0 else "ETA -")
    return (f"{label}  stage {record['stage_position']}/{record['stages']} {record['phase']} epoch "
            f"{record['epoch']}/{record['epochs']} step {record['step']}  {acc('target', record['target_acc'])}  "
            f"{acc('source', record['source_acc'])}  {elapsed:.0f}s  {eta}")


def carry_accuracies(shown: dict[str, Any] | None, new: dict[str, Any] | None) -> dict[str, Any] | None:
    """The record to show: the new one (or the one shown while none can be read), keeping the accuracies last seen
    where the new one has none (a run's start and end records carry no evaluation of their own)."""
    if new is None or shown is None:
        return new or shown
    return {**new, **{k: shown[k] for k in ("target_acc", "source_acc") if new.get(k) is None}}


class ProgressBoard:
    """A daemon thread showing every watched run until it is unwatched."""

    def __init__(self, stream: IO[str] | None = None, every: float = 1.0, live: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.every = every
        self.live = self.stream.isatty() if live is None else live
        self._runs: dict[str, _Watched] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._live_view = None

    @contextmanager
    def watch(self, label: str, run_uri: str) -> Iterator[None]:
        with self._lock:
            self._runs[label] = _Watched(label, run_uri, time.time())
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True, name="forgetless-progress")
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                watched = self._runs.pop(label, None)
            if watched is not None:  # the last word on it: its final state, as a line that stays
                watched.record = carry_accuracies(watched.record, read_progress(watched.run_uri))
                self._print_final(watched)

    def _loop(self) -> None:
        every = self.every
        while True:
            with self._lock:
                runs = list(self._runs.values())
            if not runs:
                break
            if any(storage.is_s3(w.run_uri) for w in runs):
                every = max(self.every, 5.0)  # a GET per run and look; S3 is not a local disk
            self._refresh(runs)
            time.sleep(every)
        self._stop_live()

    def _refresh(self, runs: list[_Watched]) -> None:
        for w in runs:
            w.record = carry_accuracies(w.record, read_progress(w.run_uri))
        if self.live:
            self._show_live()
        else:
            self._print_changes(runs)

    def _print_final(self, w: _Watched) -> None:
        if not self.live:
            self._print_changes([w])
            return
        line = f"[forgetless] {format_line(w.label, w.record, time.time() - w.started)}"
        view = self._live_view
        if view is not None:
            view.console.print(line, highlight=False, markup=False, soft_wrap=True)  # above the live lines
        else:
            print(line, file=self.stream, flush=True)

    def _print_changes(self, runs: list[_Watched]) -> None:
        for w in runs:
            r = w.record
            key = None if r is None else (r["stage"], r["phase"], r["epoch"], r["finished"])
            # a fresh start says nothing the driver's "Ray Train run ..." line did not (a resume says its step)
            fresh_start = r is not None and r["phase"] == "-" and not r["finished"] and not r["step"]
            if r is not None and key != w.shown and not fresh_start:
                w.shown = key
                print(f"[forgetless] {format_line(w.label, r, time.time() - w.started)}", file=self.stream,
                      flush=True)

    def _show_live(self) -> None:
        # deferred: only a terminal's live view needs rich
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        with self._lock:
            lines = [format_line(w.label, w.record, time.time() - w.started) for w in self._runs.values()]
        view = Text("\n".join(lines) if lines else "")
        if self._live_view is None:
            # transient: the live lines go when no run is left (each run's last line stays, _print_final); other
            # status lines printed meanwhile appear above them (rich redirects stderr while it shows)
            self._live_view = Live(view, console=Console(file=self.stream), refresh_per_second=2, transient=True,
                                   redirect_stdout=False, redirect_stderr=self.stream is sys.stderr)
            self._live_view.start()
        else:
            self._live_view.update(view)

    def _stop_live(self) -> None:
        if self._live_view is not None:
            self._live_view.stop()
            self._live_view = None


_board: ProgressBoard | None = None


def board() -> ProgressBoard:
    """The driver's board (one per process): live on a terminal unless --verbose (then the workers' own lines show)."""
    global _board
    if _board is None:
        _board = ProgressBoard(live=sys.stderr.isatty() and not console.verbose())
    return _board
