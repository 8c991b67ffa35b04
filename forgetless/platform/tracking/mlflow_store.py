"""The MLflow tracking store a process opens: `client(uri)`, with a new SQLite store seeded from an empty one already
at MLflow's current schema (made once per MLflow version).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from forgetless import console
from forgetless._compat import mlflow as compat_mlflow


def seed_new_sqlite_store(uri: str) -> None:
    """A new SQLite store starts as a copy of an empty store already at MLflow's current schema.

    MLflow creates a SQLite store by running every one of its schema migrations (alembic, ~200 scripts): about 2 s on
    a 2-core machine, at the first run in every folder (the demo) and in every test that tracks into a fresh folder.
    The migrated empty store is made once per MLflow version (in the temp folder, written atomically: any process may
    make it or use it) and copied; MLflow then finds its tables and schema version in place and only adds its default
    experiment, with this store's own artifact location. Any problem falls back to MLflow's own creation, and so does
    MLflow's public path (_compat/mlflow.py: the schema is made by an MLflow internal)."""
    if not uri.startswith("sqlite:///") or not compat_mlflow.SEAM.active():
        return
    db = Path(uri[len("sqlite:///"):])
    if db.exists() or not db.parent.is_dir():
        return
    try:
        template = _empty_store_template()
        _put_in_place(db, lambda tmp: shutil.copyfile(template, tmp))
    except Exception:  # noqa: BLE001 - an optimisation only: MLflow creates the store itself
        return


def _put_in_place(final: Path, write) -> None:
    """`write(tmp)` a file next to `final`, then link it in as `final` unless another process did first (a link never
    replaces a file; a reader never sees a half-written one)."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{time.monotonic_ns()}")
    try:
        write(tmp)
        os.link(tmp, final)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def _empty_store_template() -> Path:
    import mlflow
    import sqlalchemy

    template = Path(tempfile.gettempdir()) / f"forgetless-mlflow-{mlflow.__version__}-empty-store.db"
    if template.exists():
        return template

    def migrate(tmp: Path) -> None:
        engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
        try:
            if not compat_mlflow.create_store_schema(engine):
                raise RuntimeError("no template store on MLflow's public path")
        finally:
            engine.dispose()

    _put_in_place(template, migrate)
    return template


def client(uri: str):
    from mlflow.tracking import MlflowClient

    if not console.verbose():
        # its two INFO lines on a new sqlite store ("Creating initial MLflow database tables...") ask nothing of a
        # user
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    seed_new_sqlite_store(uri)
    return MlflowClient(tracking_uri=uri)


def open_store(uri: str) -> None:
    """Import MLflow and open the tracking store (a new SQLite store is created): ~2-3 s on 2 cores that need nothing
    of Ray, so the driver does it while its embedded Ray cluster starts (runner._start_ray)."""
    client(uri).search_experiments(max_results=1)
