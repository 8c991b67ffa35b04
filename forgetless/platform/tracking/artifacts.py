"""Reading a run's artifacts back from MLflow with an error that says which run and which file.

MLflow's own message for an artifact that cannot be fetched names only the path ("Failed to download artifacts from
path 'x'"); against a tracking server whose artifact store lost the object (the local stack after its S3 data was
dropped) a reader needs the run too. How long the client waits is MLflow's HTTP retry budget
(`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, `..._BACKOFF_FACTOR`, `..._TIMEOUT`; the local stack's env.sh bounds it to ~15 s).
"""
from __future__ import annotations

from pathlib import Path


class ArtifactUnavailable(RuntimeError):
    """An artifact of an MLflow run could not be read (gone from the artifact store, or the server failed)."""


def download(client, run_id: str, path: str, dst: str) -> Path:
    """The local copy of `path` of run `run_id` (under `dst`), or ArtifactUnavailable naming the run and the path."""
    from mlflow.exceptions import MlflowException  # deferred: a 2 s import
    import requests

    try:
        return Path(client.download_artifacts(run_id, path, dst))
    except (MlflowException, requests.exceptions.RequestException, OSError) as e:
        raise ArtifactUnavailable(f"MLflow run {run_id}: artifact {path!r} could not be read "
                                  f"({str(e).splitlines()[0][:300]})") from e
