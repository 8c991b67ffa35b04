"""One MLflow parent run per experiment, across invocations.

Running (or resubmitting) the same command with the same config continues the same parent run: the newest parent with
the same identity tags (`forgetless.command`, `forgetless.name`, `forgetless.config_hash`) is reopened (set back to
RUNNING) unless its driver still runs, so every child run (the pre-training included) stays under one parent however
often the experiment was stopped and resumed. The parent's tag `forgetless.invocations` counts the invocations, the tag
`forgetless.invocation_history` holds one record per invocation (started, ended, how it ended, whether every run was
re-used), and its description ends with that history in words.

A RUNNING parent of another command whose driver provably no longer runs (same host, process gone) is closed as
KILLED, said in plain words; MLflow's own "View run ... at ..." lines (printed when a run on a server is terminated)
are turned off, so the console never shows links to old runs as if they were current.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from forgetless.console import say
from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.tracking.run_descriptions import NOTE_TAG, run_path

INVOCATIONS_TAG = "forgetless.invocations"
HISTORY_TAG = "forgetless.invocation_history"
REUSED_TAG = "forgetless.results_reused"  # "true" when the last invocation found every run finished already
HISTORY_HEADING = "#### Invocations"
MAX_HISTORY = 30  # records kept in the tag (a tag value holds at most 8000 characters)
# MLflow prints "View run NAME at: URL" for every run it terminates on a tracking server (`_log_url`); the driver's
# own line already names the parent run, and links to runs being closed read as if they were the current ones.
QUIET_LINKS_VARIABLE = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


@dataclass
class Invocation:
    """One invocation of an experiment's command: when it started and ended (ms since the epoch), how it ended
    (RUNNING while it runs; FINISHED, KILLED, FAILED; GONE: its driver ended without saying), and whether every run
    it needed was finished already (re-used)."""

    number: int
    started: int
    ended: int | None = None
    status: str = "RUNNING"
    reused: bool | None = None

    def describe(self) -> str:
        text = f"{self.number}. started {_when(self.started)}"
        if self.status == "RUNNING":
            return text + ", running"
        if self.status == "GONE":
            return text + ", stopped without closing its run (its driver process was killed)"
        ended = f", {self.status.lower()} {_when(self.ended)}" if self.ended else f", {self.status.lower()}"
        reused = "; every run was finished already (results re-used)" if self.reused else ""
        return text + ended + reused


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000)) if ms else "at an unknown time"


def quiet_run_links() -> None:
    os.environ.setdefault(QUIET_LINKS_VARIABLE, "true")


def history_of(run) -> list[Invocation]:
    """The run's invocation records; a parent from before this history (or with a damaged tag) counts as one."""
    try:
        return [Invocation(**r) for r in json.loads(run.data.tags[HISTORY_TAG])]
    except (KeyError, TypeError, ValueError):
        info = run.info
        status = info.status if info.status != "RUNNING" else "GONE"
        return [Invocation(1, info.start_time, info.end_time if status != "GONE" else None, status)]


def _write_history(c, run_id: str, history: list[Invocation]) -> None:
    kept = history[-MAX_HISTORY:]
    c.set_tag(run_id, HISTORY_TAG, json.dumps([asdict(i) for i in kept]))
    c.set_tag(run_id, INVOCATIONS_TAG, str(history[-1].number))


def _latest_parent(c, experiment_id: str, tags: dict[str, str]):
    match = " and ".join(f"tags.`{k}` = '{tags[k]}'" for k in tracking.IDENTITY_TAGS if k in tags)
    if not match:
        return None
    runs = c.search_runs([experiment_id], filter_string=match, max_results=1,
                         order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def open_parent(uri: str, experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
    """The experiment's parent run for this invocation: the same command's earlier parent, reopened, or a new one.
    An earlier parent whose driver still runs (the same command running right now) is left alone: a new parent."""
    quiet_run_links()
    c = tracking.client(uri)
    now = int(time.time() * 1000)
    earlier = _latest_parent(c, experiment_id, tags)
    alive = tracking.driver_alive(earlier.data.tags.get(tracking.DRIVER_TAG, "")) if earlier is not None else False
    if earlier is not None and (earlier.info.status != "RUNNING" or alive is False):
        run_id = earlier.info.run_id
        history = history_of(earlier)
        if history[-1].status == "RUNNING":  # its driver was killed before it could end the run
            history[-1].status = "GONE"
        history.append(Invocation(history[-1].number + 1, now))
        c.set_tag(run_id, tracking.DRIVER_TAG, tracking.driver_identity())
        _write_history(c, run_id, history)
        c.update_run(run_id, status="RUNNING")
        say(f"MLflow: continuing parent run {run_id} of this experiment (invocation {history[-1].number}; the "
            f"previous one {history[-2].describe().partition(', ')[2]})")
    else:
        if earlier is not None:
            where = "another host" if alive is None else "a process that still runs"
            say(f"MLflow: the same command is running in {where} (parent run {earlier.info.run_id}); this invocation "
                f"gets a parent run of its own")
        run = c.create_run(experiment_id, run_name=run_name, tags=tracking.redact(
            {**tags, tracking.DRIVER_TAG: tracking.driver_identity()}))
        run_id, history, earlier = run.info.run_id, [Invocation(1, now)], run
        _write_history(c, run_id, history)
    c.set_tag(run_id, NOTE_TAG, with_history(earlier.data.tags.get(NOTE_TAG, ""), history))
    close_abandoned_parents(uri, experiment_id, keep=run_id)
    return run_id


def close_abandoned_parents(uri: str, experiment_id: str, keep: str) -> list[str]:
    """Close as KILLED the RUNNING parent runs of the experiment (other commands or configs than the one running now)
    whose driver no longer runs on this host, with their RUNNING child runs; returns their ids."""
    quiet_run_links()
    c = tracking.client(uri)
    closed = []
    for run in c.search_runs([experiment_id], max_results=100, filter_string=(
            f"attributes.status = 'RUNNING' and tags.`{tracking.DRIVER_TAG}` != ''")):
        if run.info.run_id == keep or tracking.PARENT_TAG in run.data.tags:
            continue
        if tracking.driver_alive(run.data.tags.get(tracking.DRIVER_TAG, "")) is not False:
            continue  # running, or on another host (unknowable): left as it is
        children = c.search_runs([experiment_id], max_results=1000, filter_string=(
            f"tags.`{tracking.PARENT_TAG}` = '{run.info.run_id}' and attributes.status = 'RUNNING'"))
        for r in [*children, run]:
            c.set_terminated(r.info.run_id, "KILLED")
        history = history_of(run)
        history[-1].status = "GONE"
        _write_history(c, run.info.run_id, history)
        closed.append(run.info.run_id)
        name = run.data.tags.get("mlflow.runName", run.info.run_id)
        say(f"MLflow: an earlier run \"{name}\" (started {_when(run.info.start_time)}) was still marked as running, "
            f"but the process that ran it has ended; it is now marked KILLED (what it logged stays)")
    return closed


def end_invocation(uri: str, run_id: str, status: str, result_run_ids: Iterable[tuple[str, str]] = ()) -> None:
    """End this invocation on its parent run: its record (how it ended; whether every run was re-used, from
    `result_run_ids`: (label, child run id) of the runs holding the results), the description's history, the run's
    status. A parent whose results all come from earlier invocations links those runs in its description."""
    quiet_run_links()
    c = tracking.client(uri)
    run = c.get_run(run_id)
    history = history_of(run)
    now = int(time.time() * 1000)
    current = history[-1]
    current.ended, current.status = now, status
    results = [(label, rid) for label, rid in result_run_ids if rid]
    if results:
        current.reused = all(_ended_before(c, rid, current.started) for _, rid in results)
        c.set_tag(run_id, REUSED_TAG, str(current.reused).lower())
    _write_history(c, run_id, history)
    c.set_tag(run_id, NOTE_TAG, with_history(run.data.tags.get(NOTE_TAG, ""), history, _reused_section(
        c, run, results) if current.reused else []))
    c.set_terminated(run_id, status)


def _ended_before(c, run_id: str, started_ms: int) -> bool:
    end = c.get_run(run_id).info.end_time
    return end is not None and end < started_ms


def _reused_section(c, parent, results: list[tuple[str, str]]) -> list[str]:
    """Where the results of an invocation that re-used every run are: links to the runs that hold them."""
    exp = parent.info.experiment_id
    lines = ["", "This invocation trained nothing: every run was finished already. The results are held by:"]
    for label, rid in results:
        other = c.get_run(rid).data.tags.get(tracking.PARENT_TAG)
        under = "" if other in (None, parent.info.run_id) else f" (under parent run [{other}]({run_path(exp, other)}))"
        lines.append(f"- [{label}]({run_path(exp, rid)}){under}")
    return lines


def with_history(description: str, history: list[Invocation], extra: list[str] = ()) -> str:
    """The description with its invocation history (replacing an earlier one) at the end."""
    body = description.split(HISTORY_HEADING)[0].rstrip()
    lines = [HISTORY_HEADING, "", f"This experiment took {history[-1].number} invocation"
             f"{'s' if history[-1].number != 1 else ''} of the same command and config:", ""]
    lines += [f"{i.describe()}" for i in history]
    return (body + "\n\n" if body else "") + "\n".join([*lines, *extra]) + "\n"


def parent_tags(run) -> dict[str, Any]:
    """The invocation tags of a parent run, for tests and tools: {invocations, history}."""
    return {"invocations": int(run.data.tags.get(INVOCATIONS_TAG, "1")), "history": history_of(run)}
