"""Raw datasets as arrays (x float32 [N, *shape], y int64 [N]): the built-in real data that ships inside packages, and
user files (.npz / Parquet) from a path or s3://."""
from __future__ import annotations

import functools
import importlib.util
import io
from pathlib import Path
from typing import Callable

import numpy as np

from forgetless.storage import read_bytes


def digits_file() -> Path:
    """scikit-learn's copy of the UCI handwritten digits (1797 rows of 64 pixels in 0..16, then the label), found
    without importing scikit-learn: its import takes 1.5-3 s, paid by the driver and by every Ray Train worker that
    builds the tasks, to read a 60 KB file."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ValueError("dataset 'digits' ships with scikit-learn, which is not installed (pip install scikit-learn)")
    return Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"


@functools.lru_cache(maxsize=None)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    rows = np.loadtxt(digits_file(), delimiter=",", dtype=np.float32)  # what sklearn's load_digits reads
    x = (rows[:, :-1] / 16.0).reshape(-1, 1, 8, 8)  # [N, 1, 8, 8], in [0, 1]
    return x, rows[:, -1].astype(np.int64)


@functools.lru_cache(maxsize=None)
def _mnist1d() -> tuple[np.ndarray, np.ndarray]:
    # mnist1d's generator rebuilds the published benchmark offline (no download): 4000 train + 1000 test.
    from mnist1d.data import get_dataset_args, make_dataset  # deferred: ~2 s to import; only this dataset needs it

    args = get_dataset_args()
    d = make_dataset(args)
    x = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)[:, None, :]  # [N, 1, 40]
    y = np.concatenate([d["y"], d["y_test"]]).astype(np.int64)
    return x, y


BUILTIN_DATASETS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "digits": _digits,
    "mnist1d": _mnist1d,
}


def load_raw_dataset(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (x, y) for a built-in dataset name or a .npz / .parquet path or s3:// URI.

    .npz: arrays `x` (N, ...) and `y` (N,). Parquet: a `label` column, and either a list column `x` or numeric columns
    (all other columns, flattened as features).
    """
    if dataset in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[dataset]()
    raw = read_bytes(dataset)
    if dataset.endswith(".npz"):
        x, y = _from_npz(dataset, raw)
    elif dataset.endswith(".parquet"):
        x, y = _from_parquet(dataset, raw)
    else:
        raise ValueError(f"unsupported dataset {dataset!r}")
    if x.ndim == 2:
        x = x[:, None, :]  # treat flat features as a 1-channel sequence so 1-D convs apply
    if len(x) != len(y):
        raise ValueError(f"{dataset}: {len(x)} inputs but {len(y)} labels")
    return x, y


def _from_npz(dataset: str, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(raw), allow_pickle=False) as f:
        if "x" not in f or "y" not in f:
            raise ValueError(f"{dataset}: a .npz dataset needs arrays named 'x' and 'y', found {list(f.keys())}")
        return f["x"].astype(np.float32), f["y"].astype(np.int64)


def _from_parquet(dataset: str, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq  # deferred: only Parquet files need it

    table = pq.read_table(io.BytesIO(raw))
    if "label" not in table.column_names:
        raise ValueError(f"{dataset}: a Parquet dataset needs a 'label' column")
    y = table.column("label").to_numpy().astype(np.int64)
    if "x" in table.column_names:
        x = np.stack([np.asarray(v, dtype=np.float32) for v in table.column("x").to_pylist()])
    else:
        cols = [c for c in table.column_names if c != "label"]
        x = np.stack([table.column(c).to_numpy().astype(np.float32) for c in cols], axis=1)
    return x, y
