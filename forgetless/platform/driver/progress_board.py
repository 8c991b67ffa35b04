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

from forgetless.platform.worker.progress_file import final_accuracies, progress_record, read_progress


@dataclass
class Watched:
    """A run the board shows. Only records written after `started` count (a progress file an earlier invocation of
    the run left behind says nothing about this one); the end line is the run's own final state when the caller
    hands it over (`ended`), not whichever record the last look happened to read."""

    label: str
    run_uri: str
    started: float
    record: dict[str, Any] | None = None
    shown: tuple | None = None  # what the last printed line showed (plain mode prints changes only)
    resume_said: bool = False  # the "resumed from" line was printed
    final: dict[str, Any] | None = None  # set by ended(): the record of the run's end, from its final state

    def ended(self, history: list[dict[str, Any]], global_step: int, stages: list[int]) -> None:
        """The run has ended with this history (RunState.history, read back from its final checkpoint): its end line
        shows the last evaluation's validation accuracies, the numbers its MLflow run ends with."""
        target, source = final_accuracies(history)
        last = history[-1] if history else {"stage": stages[-1], "epoch": 0}
        resumed = (self.record or {}).get("resumed_from")
        self.final = progress_record(self.label, last["stage"], stages, "done", 0, 1, last["epoch"], last["epoch"],
                                     global_step, target, source, finished=True, resumed_from=resumed)


def format_line(label: str, record: dict[str, Any] | None, elapsed: float) -> str:
    """One run's line: `finetune  stage 1/1 all epoch 3/8 step 120  target 91.2%  source 88.0%  12s  ETA 20s`."""
    if record is None:
        return f"{label}  starting Ray Train workers  {elapsed:.0f}s"
    if record["phase"] == "-" and not record.get("finished") and record.get("resumed_from"):
        return resume_line(label, record)
    acc = lambda name, v: f"{name} {100 * v:.1f}%" if v is not None else f"{name} -"  # noqa: E731
    if record["phase"] == "-" and not record.get("finished"):  # workers up, no epoch ended yet
        return (f"{label}  stage {record['stage_position']}/{record['stages']} training from step {record['step']}  "
                f"{elapsed:.0f}s")
    done = record.get("done") or 0.0
    eta = "done" if record.get("finished") else (f"ETA {elapsed * (1 - done) / done:.0f}s" if done > 0 else "ETA -")
    return (f"{label}  stage {record['stage_position']}/{record['stages']} {record['phase']} epoch "
            f"{record['epoch']}/{record['epochs']} step {record['step']}  {acc('target', record['target_acc'])}  "
            f"{acc('source', record['source_acc'])}  {elapsed:.0f}s  {eta}")


def resume_line(label: str, record: dict[str, Any]) -> str:
    """Where this invocation picked the run up: its checkpoint's position."""
    r = record["resumed_from"]
    return (f"{label}  resumed from its checkpoint: stage {record['stage_position']}/{record['stages']} epoch "
            f"{r.get('epoch', 0)} step {r.get('global_step', 0)}")


def carry_accuracies(shown: dict[str, Any] | None, new: dict[str, Any] | None) -> dict[str, Any] | None:
    """The record to show: the new one (or the one shown while none can be read), keeping the accuracies last seen
    where the new one has none (a run's start and end records carry no evaluation of their own)."""
    if new is None or shown is None:
        return new or shown
    return {**new, **{k: shown[k] for k in ("target_acc", "source_acc") if new.get(k) is None}}


class ProgressBoard:
    """A daemon thread showing every watched run until it is unwatched."""

    def __init__(self, stream: IO[str] | None = None, every: float = 1.0, live: bool | None = None):
        self._stream = stream
        self.every = every
        self.live = self.stream.isatty() if live is None else live
        self._runs: dict[str, Watched] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._live_view = None

    @property
    def stream(self) -> IO[str]:
        """Where lines go: the stream given, else the process's stderr as it is when a line is printed (the board is
        one per process and outlives whatever stderr was when it was made: a redirect or pytest's capture, closed
        since)."""
        return self._stream if self._stream is not None else sys.stderr

    @contextmanager
    def watch(self, label: str, run_uri: str) -> Iterator[Watched]:
        """Show the run while the block runs; the block calls `.ended(...)` on what it is given once the run's final
        state is read back, and its end line shows that state."""
        watched = Watched(label, run_uri, time.time())
        with self._lock:
            self._runs[label] = watched
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True, name="forgetless-progress")
                self._thread.start()
        try:
            yield watched
        finally:
            with self._lock:
                self._runs.pop(label, None)
            # the last word on it, as a line that stays: its final state, else the latest record it wrote
            watched.record = watched.final or carry_accuracies(watched.record, self._read(watched))
            self._print_final(watched)

    @staticmethod
    def _read(w: Watched) -> dict[str, Any] | None:
        return read_progress(w.run_uri, since=w.started)

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

    def _refresh(self, runs: list[Watched]) -> None:
        for w in runs:
            w.record = carry_accuracies(w.record, self._read(w))
        if self.live:
            self._show_live()
        else:
            self._print_changes(runs)

    def _print_final(self, w: Watched) -> None:
        if not self.live:
            self._print_changes([w])
            return
        self._say_resume(w)
        self._print_line(f"[forgetless] {format_line(w.label, w.record, time.time() - w.started)}")

    def _print_line(self, line: str) -> None:
        """A line that stays (above the live lines while they show)."""
        view = self._live_view
        if view is not None:
            view.console.print(line, highlight=False, markup=False, soft_wrap=True)
        else:
            print(line, file=self.stream, flush=True)

    def _say_resume(self, w: Watched) -> None:
        """A resumed run's first line is where it resumed, even when the board first sees a later record."""
        r = w.record
        if r is not None and r.get("resumed_from") and not w.resume_said:
            w.resume_said = True
            self._print_line(f"[forgetless] {resume_line(w.label, r)}")

    def _print_changes(self, runs: list[Watched]) -> None:
        for w in runs:
            r = w.record
            key = None if r is None else (r["stage"], r["phase"], r["epoch"], r["finished"])
            # a fresh start says nothing the driver's "Ray Train run ..." line did not (a resume says where)
            start = r is not None and r["phase"] == "-" and not r["finished"]
            if r is not None and key != w.shown:
                self._say_resume(w)
                w.shown = key
                if not start:
                    print(f"[forgetless] {format_line(w.label, r, time.time() - w.started)}", file=self.stream,
                          flush=True)

    def _show_live(self) -> None:
        # deferred: only a terminal's live view needs rich
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        with self._lock:
            runs = list(self._runs.values())
        for w in runs:
            self._say_resume(w)
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
