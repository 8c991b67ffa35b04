"""forgetless on a real multi-node Ray cluster, on this machine, from real processes (cluster/local_stack.py):
an S3-compatible server (moto, signature checks on), a Ray head (0 CPUs) + 2 worker nodes (1 CPU each) started with
`ray start`, and an MLflow server (SQLite backend, proxied artifacts in s3://BUCKET/mlflow).

The stack is stopped by PID (never `ray stop`, which would kill every Ray process on the machine, other tests'
embedded clusters included), and it uses its own Ray temp dir and token, so a plain `ray.init()` elsewhere in this
test session does not attach to it. The jobs' training workers land on the two worker nodes (the head has no CPUs), so
checkpoints really travel through S3.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import yaml

from conftest import committed_transfer_epoch

ROOT = Path(__file__).resolve().parents[1]




# ---------------------------------------------------------------------------------------------------------------------
# fast unit checks of the submission logic (no cluster)


def test_submission_id_is_deterministic(tiny_config):
    from forgetless.config import load_config
    from forgetless.platform.driver.jobs import submission_base

    a = submission_base(load_config(tiny_config()), "compare", [])
    assert a == submission_base(load_config(tiny_config()), "compare", [])
    assert a.startswith("forgetless-tiny-compare-")
    assert a != submission_base(load_config(tiny_config(seed=1)), "compare", [])
    assert a != submission_base(load_config(tiny_config()), "run", [])


def test_a_job_ships_the_forgetless_package_itself():
    # the package's own folder, not a sub-package: shipping forgetless/platform as a top-level `platform` module
    # shadowed Python's stdlib `platform` in the job, and its workers died at start (`platform.system` missing)
    from forgetless.platform.driver import jobs

    assert jobs.PACKAGE_DIR.name == "forgetless"
    assert (jobs.PACKAGE_DIR / "__init__.py").is_file() and (jobs.PACKAGE_DIR / "platform" / "driver").is_dir()


def test_job_env_forwards_aws_and_mlflow(monkeypatch):
    from forgetless.config import ConfigError
    from forgetless.platform.driver.jobs import job_env

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.local:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.local:5000")
    monkeypatch.setenv("AWS_PROFILE", "laptop-profile")
    monkeypatch.setenv("UNRELATED", "x")
    env = job_env()
    assert env["AWS_ENDPOINT_URL"] == "http://s3.local:9000" and env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.local:5000"
    assert "UNRELATED" not in env and "AWS_PROFILE" not in env
    assert "AWS_SECRET_ACCESS_KEY" not in job_env(forward_credentials=False)
    assert job_env(extra=["UNRELATED"])["UNRELATED"] == "x"
    with pytest.raises(ConfigError, match="--env NOPE"):
        job_env(extra=["NOPE"])


def test_a_job_gets_no_preemption_watcher_and_no_upload_noise(monkeypatch, caplog):
    """Ray's preemption-watcher error lines and its packaging lines are left out where the job may choose."""
    import logging

    from forgetless.platform.driver import jobs

    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    assert jobs.job_env()["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")  # a cluster on preemptible nodes wants it
    assert jobs.job_env()["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"
    packaging = logging.getLogger("ray._private.runtime_env.packaging")
    with caplog.at_level(logging.INFO):
        with jobs.upload_noise_filtered():
            packaging.info("Ignoring upload to cluster for these files: [PosixPath('/x/.gitignore')]")
            logging.getLogger("ray._private.runtime_env.working_dir").warning(
                "Directory '.venv' is now ignored by default when packaging the working directory.")
            packaging.info("Pushing file package 'gcs://_ray_pkg_x.zip' (0.1MiB) to Ray cluster...")
        packaging.info("Ignoring upload to cluster for these files: after the upload")
    assert [r.getMessage()[:20] for r in caplog.records] == ["Pushing file package", "Ignoring upload to c"]


def test_submit_refuses_what_would_be_lost(tiny_config, workdir, monkeypatch):
    """A relative storage folder or the default SQLite tracking would live in the job's temporary working dir."""
    from forgetless.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    Path("relative.yaml").write_text(yaml.safe_dump(tiny_config()))
    Path("sqlite.yaml").write_text(yaml.safe_dump(tiny_config(storage="s3://bucket/x")))
    assert main(["submit", "relative.yaml", "--address", "http://127.0.0.1:1"]) == 2
    assert main(["submit", "sqlite.yaml", "--address", "http://127.0.0.1:1"]) == 2


def test_cluster_manifests_are_complete_and_valid():
    """The cloud pieces cannot run here; they are checked for what can be checked offline: valid YAML, the Ray
    cluster-launcher file against Ray's own schema, and the KubeRay objects for the parts forgetless relies on (GPU
    worker group, image, MLflow and S3 environment, no keys). (Against KubeRay's CRD schemas too, see
    cluster/README.md, "How the cloud pieces were checked".)"""
    import jsonschema
    import ray.autoscaler

    launcher = yaml.safe_load((ROOT / "cluster/aws/cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)
    gpu = launcher["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and "IamInstanceProfile" in gpu["node_config"]
    assert launcher["available_node_types"]["head"]["resources"]["CPU"] == 0

    docs = [d for f in ("raycluster.yaml", "rayjob.yaml")
            for d in yaml.safe_load_all((ROOT / "cluster/kuberay" / f).read_text())]
    kinds = {d["kind"]: d for d in docs}
    assert {"RayCluster", "RayJob", "ServiceAccount", "ConfigMap"} <= set(kinds)
    for spec in (kinds["RayCluster"]["spec"], kinds["RayJob"]["spec"]["rayClusterSpec"]):
        group = spec["workerGroupSpecs"][0]
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["image"] == spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
        assert "MLFLOW_TRACKING_URI" in {e["name"] for e in container["env"]}
        assert group["template"]["spec"]["serviceAccountName"] == "forgetless"  # S3 via the role, no keys
    assert kinds["RayJob"]["spec"]["entrypoint"].startswith("python -m forgetless.cli ")
    exp = yaml.safe_load(kinds["ConfigMap"]["data"]["experiment.yaml"])
    from forgetless.config import load_config

    assert load_config(exp).storage.startswith("s3://")  # the example experiment is a valid config
    for f in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "aws/cluster.yaml"):
        text = (ROOT / "cluster" / f).read_text()
        assert not re.search(r"^\s*-?\s*(value|AWS_SECRET_ACCESS_KEY\s*[:=])\s*['\"]?[A-Za-z0-9/+]{40}", text, re.M)
    docker = (ROOT / "cluster/Dockerfile").read_text()
    assert "FROM ${CUDA_IMAGE}" in docker and "nvidia/cuda" in docker and "DS_BUILD_FUSED_ADAM=1" in docker


# ---------------------------------------------------------------------------------------------------------------------
# the real stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory, local_stack_module):
    ls = local_stack_module
    reuse = os.environ.get("FORGETLESS_TEST_STACK_DIR")  # a stack already up (`local_stack.py up --dir DIR`): dev loop
    if reuse:
        yield ls.LocalStack.load(reuse)
        return
    s = ls.LocalStack(str(tmp_path_factory.mktemp("stack")), workers=2, cpus_per_worker=1)
    s.up()
    yield s
    s.down()


@pytest.fixture
def cluster_env(stack, monkeypatch, workdir):
    """This shell talks to the stack: AWS_*, MLFLOW_TRACKING_URI, the Ray token (what `source env.sh` does)."""
    for k, v in stack.client_env().items():
        if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE"):  # RAY_ADDRESS would make other tests' ray.init() attach here
            monkeypatch.setenv(k, v)
    return stack


def _boto(stack):
    import boto3

    return boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name=stack.region,
                        aws_access_key_id=stack.access_key_id, aws_secret_access_key=stack.secret_access_key)


def _keys(stack, prefix: str) -> list[str]:
    s3 = _boto(stack)
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def _client(stack):
    from forgetless.platform.driver.jobs import connect

    return connect(stack.dashboard)


def _write_config(stack, tiny_config, experiment: str, prefix: str = "e2e-run", **fields) -> str:
    """A tiny config into ./EXPERIMENT.yaml; storage under s3://BUCKET/PREFIX (tests share the pre-training there)."""
    fields.setdefault("storage", f"s3://{stack.bucket}/{prefix}")
    cfg = tiny_config(tracking={"log_model": False, "experiment": experiment}, **fields)
    Path(f"{experiment}.yaml").write_text(yaml.safe_dump(cfg))
    return f"{experiment}.yaml"


def _transfer_run(path: str) -> str:
    from forgetless.config import load_config
    from forgetless.platform.driver.fits import transfer_run_name

    cfg = load_config(path)
    return transfer_run_name(cfg, cfg.strategies[0])


def _submit(args: list[str], capsys) -> tuple[int, str, str]:
    from forgetless.cli import main

    capsys.readouterr()
    rc = main(["submit", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.e2e
def test_submitted_run_lands_in_s3_and_mlflow(cluster_env, capsys, tiny_config):
    stack = cluster_env
    cfg = _write_config(stack, tiny_config, "e2e-run")
    rc, out, err = _submit([cfg, "--address", stack.dashboard, "--follow"], capsys)
    assert rc == 0, out[-4000:] + err[-2000:]
    sid = out.strip().splitlines()[0]
    assert sid.startswith("forgetless-tiny-compare-")
    # the forwarded values never appear in what forgetless printed
    assert stack.secret_access_key not in out + err and stack.ray_token not in out + err
    assert "AWS_SECRET_ACCESS_KEY" in err  # ... only the names

    keys = _keys(stack, "e2e-run/")
    pre = [k for k in keys if "-pretrain-" in k]
    assert any(k.endswith("/trajectory.json") for k in pre)
    assert any("/stop_point_e0002/" in k and k.endswith("model.pt") for k in pre)
    transfer = [k for k in keys if k.startswith(f"e2e-run/{_transfer_run(cfg)}/")]
    assert any("checkpoint_s1_done/" in k for k in transfer) and any("/final/state.json" in k for k in transfer)
    traj = json.loads(_boto(stack).get_object(Bucket=stack.bucket,
                                              Key=next(k for k in pre if k.endswith("trajectory.json")))["Body"].read())
    assert [p["epoch"] for p in traj["stop_points"]] == [0, 1, 2]
    assert all(p["uri"].startswith(f"s3://{stack.bucket}/e2e-run/") for p in traj["stop_points"])

    from mlflow.tracking import MlflowClient

    ml = MlflowClient(stack.mlflow_uri)
    exp = ml.get_experiment_by_name("e2e-run")
    runs = ml.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    child = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                 and r.data.tags.get("forgetless.mode") == "transfer")
    assert parent.info.status == child.info.status == "FINISHED"
    assert 0.0 <= child.data.metrics["val/target/acc"] <= 1.0 and "forgetting/max_pp" in child.data.metrics
    assert len(ml.get_metric_history(child.info.run_id, "val/target/acc")) >= 3  # before + 2 epochs
    names = {a.path for a in ml.list_artifacts(child.info.run_id)}
    assert {"accuracy_matrix.json", "curves.png"} <= names
    # proxied artifacts: the server wrote them into the bucket
    art = _keys(stack, "mlflow/")
    assert any(k.endswith(f"{child.info.run_id}/artifacts/accuracy_matrix.json") for k in art)
    assert any(k.endswith(f"{parent.info.run_id}/artifacts/comparison.json") for k in art)
    # no credential in any param or tag of any run
    for r in runs:
        blob = json.dumps({**r.data.params, **r.data.tags})
        assert stack.secret_access_key not in blob and stack.access_key_id not in blob and stack.ray_token not in blob
    assert "resuming from checkpoint" not in _client(stack).get_job_logs(sid)


def _committed_epoch(stack, run: str) -> int | None:
    """The epoch Ray Train has committed for a run (its checkpoint-manager snapshot in S3); see conftest."""
    try:
        body = _boto(stack).get_object(Bucket=stack.bucket, Key=f"{run}checkpoint_manager_snapshot.json")["Body"]
    except Exception:  # noqa: BLE001 - not written yet
        return None
    return committed_transfer_epoch(body.read().decode())


@pytest.mark.e2e
def test_killed_job_resumes_from_s3_checkpoint(cluster_env, capsys, tiny_config, monkeypatch):
    """Stop the job once Ray Train has committed the transfer run's 2nd-epoch checkpoint to S3; resubmitting the same
    config starts a job with a suffixed id that trains only the remaining epochs."""
    from forgetless import console
    from forgetless.platform.driver.jobs import status_of

    # as `forgetless --verbose submit`: the job's log then holds every worker's per-epoch line (read below)
    monkeypatch.setenv(console.VERBOSE_VARIABLE, "1")

    stack = cluster_env
    epochs = 10  # enough that the stop, a few seconds after epoch 2 is committed, lands mid-run
    cfg = _write_config(stack, tiny_config, "e2e-resume", train={"epochs": epochs, "lr": 0.01, "batch_size": 32})
    run = f"e2e-run/{_transfer_run(cfg)}/"  # same storage as the first test: the pre-training is reused
    rc, out, err = _submit([cfg, "--address", stack.dashboard], capsys)
    assert rc == 0, err
    sid = out.strip().splitlines()[0]
    client = _client(stack)
    deadline = time.monotonic() + 600
    while (_committed_epoch(stack, run) or 0) < 2:
        assert status_of(client, sid) in ("PENDING", "RUNNING"), client.get_job_logs(sid)[-3000:]
        assert time.monotonic() < deadline, "no committed epoch-2 checkpoint in S3 in time"
        time.sleep(1)
    client.stop_job(sid)
    while status_of(client, sid) not in ("STOPPED", "FAILED", "SUCCEEDED"):
        time.sleep(1)
    assert status_of(client, sid) == "STOPPED"
    last_epoch = _committed_epoch(stack, run)
    assert 2 <= last_epoch < epochs, "the job ended before it could be stopped mid-run"

    rc, out, err = _submit([cfg, "--address", stack.dashboard, "--follow"], capsys)
    assert rc == 0, out[-4000:] + err[-2000:]
    sid2 = out.strip().splitlines()[0]
    assert sid2 == f"{sid}-r2" and "resumes from its checkpoints" in err
    logs = client.get_job_logs(sid2)
    assert "reusing pre-training trajectory" in logs
    # `forgetless jobs status` of the resubmission says what happened: which job it resumes, and how that one ended
    from forgetless.platform.driver.jobs import describe

    assert describe(client, sid2)["resumes"].startswith(f"{sid} (STOPPED")
    state = json.loads(_boto(stack).get_object(Bucket=stack.bucket, Key=f"{run}final/state.json")["Body"].read())
    resumed = state["resumed_from"]["epoch"]
    said = "\n".join(line for line in logs.splitlines() if re.search("resuming|skipping|starting over", line))
    if resumed == last_epoch - 1:
        # the stop came between Ray Train's commit and the manifest rank 0 writes after it: that checkpoint was
        # never completed, so it is skipped with a warning naming it (docs/reliability.md)
        assert re.search(rf"checkpoint_s1_p0_e{last_epoch:04d} is damaged or incomplete, skipping it: no manifest",
                         logs), said
    else:
        assert resumed == last_epoch, (resumed, last_epoch, said)
    # the resume line names the checkpoint it verified and resumed from
    assert re.search(rf"resuming from checkpoint checkpoint_s1_p0_e{resumed:04d}: stage 1 phase 0 epoch {resumed} ",
                     logs), said
    trained = sorted({int(m) for m in re.findall(rf"stage 1 phase \w+ epoch (\d+)/{epochs}", logs)})
    assert trained == list(range(resumed + 1, epochs + 1)), logs[-3000:]
    epochs_seen = [h["epoch"] for h in state["history"] if h["stage"] == 1 and h["phase"] != "before"]
    assert epochs_seen == list(range(1, epochs + 1))  # every epoch once: none lost, none repeated

    # MLflow: one parent for the experiment, counting both jobs, with the (resumed) transfer run under it
    from mlflow.tracking import MlflowClient

    ml = MlflowClient(stack.mlflow_uri)
    exp = ml.get_experiment_by_name("e2e-resume")
    parents = [r for r in ml.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert [(p.info.status, p.data.tags["forgetless.invocations"]) for p in parents] == [("FINISHED", "2")]
    children = ml.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    (transfer,) = [r for r in children if r.data.tags.get("forgetless.mode") == "transfer"]
    assert "View run" not in logs
    # the progress lines: the resumed run's first is its resume point, its last the numbers MLflow holds
    board = [line for line in logs.splitlines() if line.startswith("[forgetless] finetune  ")]
    assert board[0].startswith("[forgetless] finetune  resumed from its checkpoint: stage 1/1 epoch "), board
    assert board[-1].endswith("done") and f"target {100 * transfer.data.metrics['val/target/acc']:.1f}%" in board[-1]


@pytest.mark.e2e
def test_bad_submissions_leave_nothing_behind(cluster_env, capsys, monkeypatch, tiny_config):
    from mlflow.tracking import MlflowClient

    from forgetless.config import ConfigError
    from forgetless import storage
    from forgetless.platform.driver.jobs import submit

    stack = cluster_env
    good = _write_config(stack, tiny_config, "e2e-bad", prefix="e2e-bad")
    jobs_before = {j.submission_id for j in _client(stack).list_jobs()}
    runs_before = len(MlflowClient(stack.mlflow_uri).search_runs(
        [e.experiment_id for e in MlflowClient(stack.mlflow_uri).search_experiments()]))

    with pytest.raises(ConfigError, match=r"--address: no Ray Jobs API at http://127\.0\.0\.1:1 "):
        submit(good, [], "http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="storage: .*bucket 'no-such-bucket' does not exist"):
        submit(_write_config(stack, tiny_config, "e2e-bad-bucket", storage="s3://no-such-bucket/x"), [],
               stack.dashboard)
    with monkeypatch.context() as m:
        m.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        with pytest.raises(ConfigError, match="storage: .*rejected the credentials") as e:
            submit(good, [], stack.dashboard)
        assert "not-the-secret" not in str(e.value)
    with monkeypatch.context() as m:
        m.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
        with pytest.raises(ConfigError, match="MLflow server http://127.0.0.1:1 is not reachable"):
            submit(good, [], stack.dashboard)
    with monkeypatch.context() as m:
        m.setenv("RAY_AUTH_TOKEN", "not-the-token")
        with pytest.raises(ConfigError, match="--address: .*token"):
            submit(good, [], stack.dashboard)

    assert {j.submission_id for j in _client(stack).list_jobs()} == jobs_before
    assert len(MlflowClient(stack.mlflow_uri).search_runs(
        [e.experiment_id for e in MlflowClient(stack.mlflow_uri).search_experiments()])) == runs_before
    assert storage.list_files(f"s3://{stack.bucket}/e2e-bad") == []


@pytest.mark.e2e
def test_local_storage_is_refused_on_a_multi_node_cluster(cluster_env, capsys, tmp_path, tiny_config):
    """The job itself refuses (ray_cluster.check_resources) before any training or MLflow run: the local folder would be
    a different disk on every node."""
    from mlflow.tracking import MlflowClient

    from forgetless.platform.driver.jobs import status_of

    stack = cluster_env
    cfg = _write_config(stack, tiny_config, "e2e-local", storage=str(tmp_path / "runs"))
    rc, out, err = _submit([cfg, "--address", stack.dashboard, "--follow"], capsys)
    assert rc == 1
    sid = out.strip().splitlines()[0]
    assert status_of(_client(stack), sid) == "FAILED"
    assert "storage: the Ray cluster has 3 nodes but storage is the local folder" in out
    assert MlflowClient(stack.mlflow_uri).get_experiment_by_name("e2e-local") is None
    assert not (tmp_path / "runs").exists()


@pytest.mark.e2e
@pytest.mark.slow
def test_down_and_up_keep_the_mlflow_store_and_its_s3_data_together(tmp_path, local_stack_module, monkeypatch):
    """`down` then `up`: an old run's artifact is there again; an artifact whose object is gone is an error within
    ~30 s naming the run and the path (the stack's MLflow retry settings); a stack whose S3 server died leaves no
    MLflow store pointing at lost data; `--drop-data` drops both."""
    from mlflow.tracking import MlflowClient

    from forgetless.platform.tracking import artifacts

    ls = local_stack_module
    folder = str(tmp_path / "stack")

    def up():
        s = ls.LocalStack(folder).up(ray=False)
        for k, v in s.client_env().items():
            if k.startswith(("AWS_", "MLFLOW_")):
                monkeypatch.setenv(k, v)
        return s, MlflowClient(s.mlflow_uri)

    stack, c = up()
    try:
        run = c.create_run(c.create_experiment("kept")).info.run_id
        Path(tmp_path, "note.txt").write_text("kept across down and up")
        c.log_artifact(run, str(tmp_path / "note.txt"))
        c.set_terminated(run)
    finally:
        stack.down()
    stack, c = up()
    try:
        got = c.download_artifacts(run, "note.txt", str(tmp_path / "back"))
        assert Path(got).read_text() == "kept across down and up"
        s3 = stack._s3()
        key = next(k["Key"] for k in s3.list_objects_v2(Bucket=stack.bucket, Prefix="mlflow/")["Contents"]
                   if run in k["Key"] and k["Key"].endswith("note.txt"))
        s3.delete_object(Bucket=stack.bucket, Key=key)
        started = time.monotonic()
        with pytest.raises(artifacts.ArtifactUnavailable) as gone:  # how forgetless's readers fetch an artifact
            artifacts.download(c, run, "note.txt", str(tmp_path / "gone"))
        assert time.monotonic() - started < 35
        assert run in str(gone.value) and "note.txt" in str(gone.value)
        # the S3 server dies: its data cannot be kept, so neither is the MLflow store that points at it
        s3_proc = next(p for p in stack.procs if p.name == "s3")
        ls._signal_group(s3_proc.pid, 9)
    finally:
        stack.down()
    assert not Path(folder, "mlflow.db").exists() and list(Path(folder).glob("mlflow.db.orphaned-*"))
    stack, c = up()
    stack.down(keep_data=False)
    assert not Path(folder, "mlflow.db").exists() and not Path(folder, "s3-data").exists()
