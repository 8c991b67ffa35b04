"""One MLflow parent run per experiment across invocations (tracking/invocations.py), on a real SQLite MLflow store:
a killed driver's parent is reopened by the next invocation of the same command, its children stay under it, the
parent counts its invocations; a re-run that trains nothing says so and links the runs holding the results; another
command's abandoned parent is closed as KILLED in plain words."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from forgetless.platform.tracking import invocations
from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.tracking.run_descriptions import NOTE_TAG

TAGS = {"forgetless.command": "compare", "forgetless.name": "tiny", "forgetless.config_hash": "0123abcd"}
# A driver that opens the experiment's parent, starts a child under it (the pre-training) and is killed (SIGKILL:
# it can end nothing itself).
KILLED_DRIVER = """
import os, signal, sys
from forgetless.platform.tracking import invocations, mlflow_runs as tracking
uri, exp_id, command = sys.argv[1], sys.argv[2], sys.argv[3]
tags = {"forgetless.command": command, "forgetless.name": "tiny", "forgetless.config_hash": "0123abcd"}
parent = invocations.open_parent(uri, exp_id, "tiny (" + command + ")", tags)
target = tracking.TrackingTarget(uri, exp_id, parent)
child = tracking.open_child_run(target, "tiny-pretrain-abc", "pretrain", {tracking.RUN_KEY_TAG: "tiny-pretrain-abc"}, {})
print(parent, child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.client(uri)  # a new store, from the migrated template
    c = MlflowClient(uri)
    return uri, c, c.create_experiment("invocations")


def _killed_driver(uri: str, exp_id: str, command: str = "compare") -> tuple[str, str]:
    out = subprocess.run([sys.executable, "-c", KILLED_DRIVER, uri, exp_id, command], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    parent, child = out.stdout.split()[-2:]
    return parent, child


def test_a_killed_invocation_and_its_rerun_are_one_parent_with_every_child(store, capsys):
    uri, c, exp_id = store
    parent, pretrain_child = _killed_driver(uri, exp_id)
    assert c.get_run(parent).info.status == "RUNNING"  # nobody could end it

    again = invocations.open_parent(uri, exp_id, "tiny (compare)", TAGS)
    assert again == parent
    run = c.get_run(parent)
    assert run.info.status == "RUNNING" and run.data.tags[invocations.INVOCATIONS_TAG] == "2"
    history = invocations.history_of(run)
    assert [h.status for h in history] == ["GONE", "RUNNING"]
    assert "continuing parent run" in capsys.readouterr().err
    # the resumed child (found by its run key, as a worker does) stays under the same parent
    target = tracking.TrackingTarget(uri, exp_id, parent)
    resumed = tracking.open_child_run(target, "tiny-pretrain-abc", "pretrain", {tracking.RUN_KEY_TAG: "tiny-pretrain-abc"},
                                      {})
    assert resumed == pretrain_child
    finetune = tracking.open_child_run(target, "tiny-finetune-abc", "finetune", {tracking.RUN_KEY_TAG: "tiny-finetune-abc"},
                                       {})
    for rid in (pretrain_child, finetune):
        c.set_terminated(rid, "FINISHED")
    invocations.end_invocation(uri, parent, "FINISHED", [("finetune", finetune)])

    parents = c.search_runs([exp_id], "tags.`forgetless.command` = 'compare'")
    assert [r.info.run_id for r in parents] == [parent]
    children = c.search_runs([exp_id], f"tags.`{tracking.PARENT_TAG}` = '{parent}'")
    assert {r.info.run_id for r in children} == {pretrain_child, finetune}
    done = c.get_run(parent)
    assert done.info.status == "FINISHED" and done.data.tags[invocations.INVOCATIONS_TAG] == "2"
    assert done.data.tags[invocations.REUSED_TAG] == "false"  # the finetune run trained in this invocation
    note = done.data.tags[NOTE_TAG]
    assert "took 2 invocations" in note and "stopped without closing its run" in note and "finished" in note


def test_a_rerun_that_trains_nothing_says_so_and_links_the_runs(store):
    uri, c, exp_id = store
    parent = invocations.open_parent(uri, exp_id, "tiny (compare)", TAGS)
    child = c.create_run(exp_id, tags={tracking.PARENT_TAG: parent}).info.run_id
    c.set_terminated(child, "FINISHED")
    invocations.end_invocation(uri, parent, "FINISHED", [("finetune", child)])
    c.set_tag(parent, NOTE_TAG, c.get_run(parent).data.tags[NOTE_TAG] + "\n\nno such line")  # kept below the table

    second = invocations.open_parent(uri, exp_id, "tiny (compare)", TAGS)
    assert second == parent  # a finished experiment run again continues its parent (no empty parent)
    invocations.end_invocation(uri, parent, "FINISHED", [("finetune", child)])
    run = c.get_run(parent)
    assert run.data.tags[invocations.REUSED_TAG] == "true"
    assert run.data.tags[invocations.INVOCATIONS_TAG] == "2"
    note = run.data.tags[NOTE_TAG]
    assert note.count(invocations.HISTORY_HEADING) == 1  # the history is replaced, not appended twice
    assert "every run was finished already" in note and f"runs/{child}" in note
    assert [h.reused for h in invocations.history_of(run)] == [False, True]


def test_another_commands_abandoned_parent_is_closed_in_plain_words(store, capsys):
    uri, c, exp_id = store
    stale, stale_child = _killed_driver(uri, exp_id, command="run")
    live_other = c.create_run(exp_id, tags={**TAGS, "forgetless.command": "tune",
                                            tracking.DRIVER_TAG: tracking.driver_identity()}).info.run_id
    parent = invocations.open_parent(uri, exp_id, "tiny (compare)", TAGS)
    assert parent != stale
    assert c.get_run(stale).info.status == "KILLED" and c.get_run(stale_child).info.status == "KILLED"
    assert c.get_run(live_other).info.status == "RUNNING"  # its driver (this process) runs
    err = capsys.readouterr().err
    assert "now marked KILLED" in err and "View run" not in err
    assert os.environ.get(invocations.QUIET_LINKS_VARIABLE) == "true"  # MLflow's own links for closed runs are off


def test_a_live_invocation_of_the_same_command_is_left_alone(store):
    uri, c, exp_id = store
    first = invocations.open_parent(uri, exp_id, "tiny (compare)", TAGS)  # its driver is this process: alive
    second = invocations.open_parent(uri, exp_id, "tiny (compare)", TAGS)
    assert second != first and c.get_run(first).info.status == "RUNNING"
