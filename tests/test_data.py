"""Tasks from real packaged data and from user files: splits, class subsets, determinism, transforms."""
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from forgetless.config import TaskConfig
from forgetless.data import build_stream, build_task, load_raw_dataset


def test_digits_class_split_is_disjoint_and_deterministic():
    t = build_task(TaskConfig(dataset="digits", classes=[5, 6, 7, 8, 9]))
    assert t.classes == [5, 6, 7, 8, 9] and t.num_classes == 5
    assert t.input_shape == (1, 8, 8)
    assert set(t.y_train.tolist()) == set(range(5))
    n = len(t.x_train) + len(t.x_val) + len(t.x_test)
    assert 850 < n < 950  # about half of the 1,797 digits
    # no sample appears in two splits
    rows = lambda x: {tuple(r) for r in x.reshape(len(x), -1).tolist()}  # noqa: E731
    assert not (rows(t.x_train) & rows(t.x_test))
    again = build_task(TaskConfig(dataset="digits", classes=[5, 6, 7, 8, 9]))
    assert torch.equal(t.x_train, again.x_train) and torch.equal(t.y_test, again.y_test)
    other = build_task(TaskConfig(dataset="digits", classes=[5, 6, 7, 8, 9], split_seed=1))
    assert not torch.equal(t.y_train, other.y_train) or not torch.equal(t.x_train, other.x_train)


def test_mnist1d_offline_and_few_shot():
    t = build_task(TaskConfig(dataset="mnist1d", classes=[0, 1, 2], samples_per_class=10))
    assert t.input_shape == (1, 40)
    assert len(t.x_train) == 30
    assert np.bincount(t.y_train.numpy()).tolist() == [10, 10, 10]


def test_label_order_follows_classes_list():
    t = build_task(TaskConfig(dataset="digits", classes=[9, 3]))
    # local label 0 is class 9: check against the raw data
    x, y = load_raw_dataset("digits")
    first_nine = torch.from_numpy(x[y == 9])
    train_nines = t.x_train[t.y_train == 0]
    assert any(torch.equal(train_nines[0], r) for r in first_nine)


def test_transforms_change_inputs_and_resample_to_backbone_shape():
    base = build_task(TaskConfig(dataset="digits", classes=[0, 1]))
    perm = build_task(TaskConfig(dataset="digits", classes=[0, 1], transforms=[{"kind": "permute", "seed": 3}]))
    assert not torch.equal(base.x_train, perm.x_train)
    assert torch.allclose(base.x_train.sum(dim=(1, 2, 3)), perm.x_train.sum(dim=(1, 2, 3)))  # same pixels, moved
    stream = build_stream(TaskConfig(dataset="digits", classes=[0, 1]),
                          [TaskConfig(dataset="mnist1d", classes=[0, 1], transforms=[{"kind": "resample", "length": 64}])])
    assert stream[1].input_shape == (1, 8, 8)


def test_user_npz_and_parquet(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    y = np.repeat(np.arange(3), 40)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    t = build_task(TaskConfig(dataset=str(tmp_path / "d.npz")))
    assert t.input_shape == (1, 6) and t.num_classes == 3
    pq.write_table(pa.table({"f0": x[:, 0], "f1": x[:, 1], "label": y}), tmp_path / "d.parquet")
    t2 = build_task(TaskConfig(dataset=str(tmp_path / "d.parquet"), classes=[0, 2]))
    assert t2.input_shape == (1, 2) and t2.num_classes == 2
    np.savez(tmp_path / "bad.npz", inputs=x)
    with pytest.raises(ValueError, match="'x' and 'y'"):
        build_task(TaskConfig(dataset=str(tmp_path / "bad.npz")))


def test_missing_class_is_an_error():
    with pytest.raises(ValueError, match="do not occur"):
        build_task(TaskConfig(dataset="digits", classes=[1, 42]))


def test_digits_are_scikit_learns_digits_read_without_importing_it():
    from sklearn.datasets import load_digits

    x, y = load_raw_dataset("digits")
    d = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, 0], (d.images / 16.0).astype(np.float32))
    np.testing.assert_array_equal(y, d.target)
    # a fresh process: building a digits task must not import scikit-learn (1.5-3 s in every worker)
    code = ("import sys; from forgetless.data import build_task; from forgetless.config import TaskConfig; "
            "build_task(TaskConfig(dataset='digits', classes=[0, 1])); print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
