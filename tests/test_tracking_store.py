"""A new SQLite MLflow store starts as a copy of a migrated empty store; MLflow uses it as its own."""
from pathlib import Path

from forgetless._compat import PUBLIC_PATHS_VARIABLE
from forgetless.platform.tracking import mlflow_runs as tracking
from forgetless.platform.tracking import mlflow_store


def test_a_seeded_store_is_mlflows_own_and_an_existing_one_is_never_replaced(workdir):
    tmp_path = workdir  # the default store ./mlflow.db (MLFLOW_TRACKING_URI unset)
    uri = tracking.resolve_tracking_uri(None)
    tracking.seed_new_sqlite_store(uri)
    assert Path("mlflow.db").is_file()
    template = mlflow_store._empty_store_template()
    assert template.is_file() and template.stat().st_size == Path("mlflow.db").stat().st_size

    exp = tracking.ensure_experiment(uri, "seeded")  # MLflow verifies the schema version on opening
    c = tracking.client(uri)
    run = c.create_run(exp)
    c.log_metric(run.info.run_id, "acc", 0.5)
    default = c.get_experiment("0")  # made by MLflow on first open, with this store's artifact location
    assert default.name == "Default" and str(tmp_path) in default.artifact_location

    tracking.seed_new_sqlite_store(uri)  # the store exists: left as it is
    assert tracking.client(uri).get_run(run.info.run_id).data.metrics["acc"] == 0.5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mlflow.db")]  # no copy left behind

    # a second folder gets its own empty copy (no run of the first leaks into it)
    other = tmp_path / "other"
    other.mkdir()
    uri2 = "sqlite:///" + str(other / "mlflow.db")
    exp2 = tracking.ensure_experiment(uri2, "seeded")
    assert tracking.client(uri2).search_runs([exp2]) == []


def test_without_a_template_mlflow_creates_the_store_itself(tmp_path, monkeypatch):
    def broken():
        raise OSError("read-only temp folder")

    monkeypatch.setattr(mlflow_store, "_empty_store_template", broken)
    uri = "sqlite:///" + str(tmp_path / "mlflow.db")
    tracking.seed_new_sqlite_store(uri)
    assert not (tmp_path / "mlflow.db").exists()
    exp = tracking.ensure_experiment(uri, "plain")
    assert tracking.client(uri).get_experiment(exp).name == "plain"


def test_on_mlflows_public_path_mlflow_creates_the_store_itself(tmp_path, monkeypatch):
    monkeypatch.setenv(PUBLIC_PATHS_VARIABLE, "1")  # no _initialize_tables (an MLflow internal): no template
    uri = "sqlite:///" + str(tmp_path / "mlflow.db")
    tracking.seed_new_sqlite_store(uri)
    assert not (tmp_path / "mlflow.db").exists()
    exp = tracking.ensure_experiment(uri, "public")
    assert tracking.client(uri).get_experiment(exp).name == "public"
