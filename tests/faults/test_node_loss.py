"""A worker node lost in the middle of a compare, on real processes (issue 32): the local multi-node stack
(cluster/local_stack.py: a Ray head with no CPUs, two `ray start` worker nodes with 1 CPU each, S3 through moto, an
MLflow server), an elastic run (`scaling.num_workers: [1, 2]`) submitted as a job. Once the run has committed its 2nd
transfer epoch, worker node 2 is killed as a reclaimed machine is (SIGKILL to its raylet's process group and every
process of the node); the run goes on by itself on the 1 worker left; the node is then started again, and the run grows
back to 2 workers at its next checkpoint. Next to it, in the same compare, the same run without a fault (a second
label of the same strategy: the same training, its own run name) is the reference for the accuracy matrix.

Slow (minutes: two runs of 120 epochs, a node's death and start on 2 shared cores): `make test-all`, or
    .venv/bin/python -m pytest -q -m slow tests/faults/test_node_loss.py
"""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import committed_transfer_epoch

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(2700)]

EPOCHS = 120  # ~1 s each here: room for the shrink (up to ~80 s) and the node's start (~30-60 s)
# The accuracy matrices of the interrupted and the uninterrupted run may differ by this much (a fraction): both train
# on the same global batches in the same order with the same schedule, but on 1 worker the gradients are summed over
# 2 micro-batches by one rank, on 2 workers by an all-reduce over two ranks: fp32 sums in another order (~1e-7
# relative per step), which 120 epochs of SGD may grow into a test prediction or two flipping.
R_TOLERANCE = 0.02


def _wait(what: str, check, timeout: float, every: float = 1.0, while_true=None, log=None):
    """Wait for `check()`; `while_true()` must hold meanwhile; `log()`: what to show if the wait runs out."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if while_true is not None:
            while_true()
        if time.monotonic() >= deadline:
            pytest.fail(f"waited {timeout:.0f} s for {what}" + (f"; the job's controller and forgetless lines:\n"
                                                                f"{log()}" if log else ""))
        time.sleep(every)


def _epochs_trained(stack, label: str) -> Counter:
    """epoch -> how many worker processes of the stack trained it, from the workers' own log files (rank 0 prints an
    epoch's line once it is trained)."""
    files = {p.resolve() for p in Path(stack.ray_temp_dir).glob("**/logs/worker-*.err")}
    line = re.compile(rf"^\[forgetless {label}\] stage 1 phase \w+ epoch (\d+)/{EPOCHS}", re.M)
    return Counter(int(e) for f in files for e in set(line.findall(f.read_text(errors="replace"))))


def _said(logs: str) -> str:
    """The lines of a job's log that say what the run did (Ray Train's controller, forgetless), the last 60."""
    keep = [line[:300] for line in logs.splitlines()
            if ("TrainController" in line or "forgetless" in line) and "File \"" not in line
            and "Reporting training result" not in line]
    return "\n".join(keep[-60:])


@pytest.fixture
def stack(tmp_path, local_stack_module, monkeypatch, workdir):
    s = local_stack_module.LocalStack(str(tmp_path / "stack"), workers=2, cpus_per_worker=1)
    s.up()
    for k, v in s.client_env().items():
        if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
            monkeypatch.setenv(k, v)
    try:
        yield s
    finally:
        s.down(keep_data=False)


def _boto(stack):
    import boto3

    return boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name=stack.region,
                        aws_access_key_id=stack.access_key_id, aws_secret_access_key=stack.secret_access_key)


def _read(stack, key: str) -> str | None:
    try:
        return _boto(stack).get_object(Bucket=stack.bucket, Key=key)["Body"].read().decode()
    except Exception:  # noqa: BLE001 - not there (yet)
        return None


def _committed_epoch(stack, run: str) -> int:
    snapshot = _read(stack, f"{run}/checkpoint_manager_snapshot.json")
    return (committed_transfer_epoch(snapshot) if snapshot else None) or 0


# ZeRO-2 is the default stage (a resume on 1 worker re-cuts the 2 ranks' optimizer partitions:
# platform/worker/reshard.py); ZeRO-0 keeps whole optimizer states on every rank
@pytest.mark.parametrize("zero_stage", [2, 0])
def test_a_lost_node_shrinks_the_run_and_a_returned_one_grows_it(stack, tiny_config, capsys, monkeypatch,
                                                                 zero_stage):
    from forgetless import console
    from forgetless.cli import main
    from forgetless.config import load_config
    from forgetless.platform.driver.fits import transfer_run_name
    from forgetless.platform.driver.jobs import connect, status_of

    monkeypatch.setenv(console.VERBOSE_VARIABLE, "1")  # the job's log then holds every epoch line of rank 0
    cfg = tiny_config(storage=f"s3://{stack.bucket}/node-loss", tracking={"log_model": False, "experiment": "node-loss"},
                      scaling={"num_workers": [1, 2], "max_concurrent": 1},
                      deepspeed={"zero_stage": zero_stage},
                      train={"epochs": EPOCHS, "lr": 0.01, "batch_size": 64},
                      strategies=[{"name": "finetune", "label": "reference"}, {"name": "finetune", "label": "lost"}])
    Path("c.yaml").write_text(yaml.safe_dump(cfg))
    loaded = load_config("c.yaml")
    reference, lost = (f"node-loss/{transfer_run_name(loaded, s)}" for s in loaded.strategies)

    capsys.readouterr()
    t0 = time.monotonic()
    assert main(["submit", "c.yaml", "--address", stack.dashboard]) == 0
    sid = capsys.readouterr().out.strip().splitlines()[0]
    client = connect(stack.dashboard)

    def job_running():
        assert status_of(client, sid) in ("PENDING", "RUNNING"), _said(client.get_job_logs(sid))

    def said():
        return _said(client.get_job_logs(sid))

    # 1. the run under test has committed its 2nd epoch on 2 workers: node 2 is lost
    _wait("the run's 2nd committed epoch", lambda: _committed_epoch(stack, lost) >= 2, 900, while_true=job_running)
    t_kill = time.monotonic()
    killed = stack.stop_worker_node(2)
    killed_at = _committed_epoch(stack, lost)
    assert killed, "no process of node 2 was found"
    # 2. it goes on without anyone doing anything: restarted on the one worker left (its resize line), and epochs
    # committed after that
    shrunk = re.compile(r"\[forgetless lost\] resized: 2 -> 1 workers")
    _wait("the run's restart on 1 worker", lambda: shrunk.search(client.get_job_logs(sid)), 600, every=2,
          while_true=job_running, log=said)
    t_shrunk = time.monotonic()
    resumed_at = _committed_epoch(stack, lost)
    _wait("2 epochs committed on 1 worker", lambda: _committed_epoch(stack, lost) >= resumed_at + 2, 600,
          while_true=job_running, log=said)
    assert _committed_epoch(stack, lost) < 10**6, "the run ended before the node came back: more EPOCHS"
    # 3. the node comes back (once the head has marked it dead): the run grows at its next checkpoint
    _wait("the head to mark node 2 dead", lambda: stack.alive_nodes() == 2, 180)
    stack.start_worker_node(2)
    t_back = time.monotonic()
    grown = re.compile(r"\[forgetless lost\] resized: 1 -> 2 workers")
    _wait("the run's restart on 2 workers", lambda: grown.search(client.get_job_logs(sid)), 600, every=2,
          while_true=job_running, log=said)
    t_grown = time.monotonic()
    _wait("the job's end", lambda: status_of(client, sid) not in ("PENDING", "RUNNING"), 1200, every=2)
    t_end = time.monotonic()
    logs = client.get_job_logs(sid)
    assert status_of(client, sid) == "SUCCEEDED", _said(logs)

    states = {run: json.loads(_read(stack, f"{run}/final/state.json")) for run in (reference, lost)}
    ref, got = states[reference], states[lost]
    # the worker counts: the reference stayed on 2; the other shrank to 1 and grew back to 2
    assert [r["workers"] for r in ref["workers"]] == [2]
    assert [r["workers"] for r in got["workers"]] == [2, 1, 2], got["workers"]
    shrank_at, grew_at = got["workers"][1]["step"], got["workers"][2]["step"]
    assert 0 < shrank_at < grew_at < got["global_step"]
    # the same optimizer steps whatever the worker count (the global batch is the config's)
    assert got["global_step"] == ref["global_step"]
    # every epoch is in the history once; none finished was trained again but the one in flight at each resize
    epochs = [h["epoch"] for h in got["history"] if h["stage"] == 1 and h["phase"] != "before"]
    assert epochs == list(range(1, EPOCHS + 1))
    # What each worker process trained, from its own log file on its node (the nodes' Ray temp dirs; a node started
    # again has a new one, the lost node's stays): the job's log is not the record here, since Ray's log forwarding
    # lost the first seconds of a restarted rank 0's lines in 2 of 4 runs on 2 loaded cores (its epoch lines 5-7).
    trained = _epochs_trained(stack, "lost")
    assert set(trained) == set(range(1, EPOCHS + 1)), sorted(trained)
    again = {e: n - 1 for e, n in trained.items() if n > 1}
    assert sum(again.values()) <= 2 and all(n == 1 for n in again.values()), again
    in_job_log = {int(m) for m in re.findall(rf"\[forgetless lost\] stage 1 phase \w+ epoch (\d+)/{EPOCHS}", logs)}
    # what the user sees: a line per resize, with its cause
    assert re.search(r"\[forgetless lost\] resized: 2 -> 1 workers at step \d+: a worker or its node was lost", logs)
    assert re.search(r"\[forgetless lost\] resized: 1 -> 2 workers at step \d+: room returned", logs)
    # the accuracy matrix of the interrupted run is that of the uninterrupted one, to R_TOLERANCE
    diff = max(abs(a - b) for ra, rb in zip(ref["R"], got["R"], strict=True) for a, b in zip(ra, rb, strict=True))
    assert diff <= R_TOLERANCE, (ref["R"], got["R"])

    from mlflow.tracking import MlflowClient

    ml = MlflowClient(stack.mlflow_uri)
    exp = ml.get_experiment_by_name("node-loss")
    (child,) = [r for r in ml.search_runs([exp.experiment_id]) if r.data.tags.get("forgetless.run_name") ==
                lost.split("/", 1)[1]]
    assert child.info.status == "FINISHED"
    tags = child.data.tags
    assert tags["forgetless.workers"] == "2" and tags["forgetless.resizes"] == "2"
    assert tags["forgetless.resize.1"].startswith(f"2 -> 1 workers at step {shrank_at},")
    assert tags["forgetless.resize.2"].startswith(f"1 -> 2 workers at step {grew_at},")
    counts = [(m.step, m.value) for m in sorted(ml.get_metric_history(child.info.run_id, "ray/workers"),
                                                 key=lambda m: m.step)]
    assert [v for _, v in counts][0] == 2.0 and 1.0 in {v for _, v in counts} and counts[-1][1] == 2.0
    # the measurements docs/reliability.md quotes (printed with -s)
    print(f"\nnode-loss: killed after epoch {killed_at} ({len(killed)} processes) at {t_kill - t0:.0f} s; "
          f"training again on 1 worker {t_shrunk - t_kill:.0f} s after; node back at {t_back - t0:.0f} s, training on 2 workers {t_grown - t_back:.0f} s later; "
          f"shrank at step {shrank_at}, grew at step {grew_at} of {got['global_step']}; epochs trained again: "
          f"{again or 'none'}; max |R - R_ref| = {diff:.4f}; job {t_end - t0:.0f} s; epoch lines in the job's log: "
          f"{len(in_job_log)} of {EPOCHS}")
