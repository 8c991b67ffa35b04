"""The driver's built stream reaches the workers through Ray's object store, so workers need not re-read the data."""
import numpy as np
import torch

from forgetless.config import load_config
from forgetless.platform.worker import shared_tasks


def _npz_config(tiny_config, path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 16)).astype(np.float32)
    y = np.repeat(np.arange(4), 30)
    np.savez(path, x=x, y=y)
    return load_config(tiny_config(source={"dataset": str(path), "classes": [0, 1]},
                                   targets=[{"dataset": str(path), "classes": [2, 3]}]))


def test_a_worker_reads_the_drivers_tasks_after_the_data_file_is_gone(ray_session, tiny_config, tmp_path):
    cfg = _npz_config(tiny_config, tmp_path / "data.npz")
    built = shared_tasks.built_stream(cfg)
    ref = shared_tasks.share(cfg)
    (tmp_path / "data.npz").unlink()  # a worker that rebuilt the stream would fail here

    @ray_session.remote
    def in_a_worker(refs):
        tasks = shared_tasks.fetch(refs[0])
        return [(t.name, t.x_train.sum().item(), t.y_test.tolist()) for t in tasks]

    got = ray_session.get(in_a_worker.remote([ref]), timeout=120)
    assert got == [(t.name, t.x_train.sum().item(), t.y_test.tolist()) for t in built]
    assert len(got) == 2 and got[0][0] != got[1][0]


def test_the_driver_rebuilds_when_the_configs_change(tiny_config, tmp_path):
    cfg = _npz_config(tiny_config, tmp_path / "a.npz")
    first = shared_tasks.built_stream(cfg)
    assert shared_tasks.built_stream(cfg) is first  # the same configs: built once
    other = load_config(tiny_config())  # digits
    tasks = shared_tasks.built_stream(other)
    assert tasks is not first and tasks[0].input_shape == (1, 8, 8)
    assert not torch.equal(tasks[0].x_train[:1].flatten()[:16], first[0].x_train[:1].flatten()[:16])
    for i in range(shared_tasks.KEEP):  # a few streams are kept, the oldest dropped first
        shared_tasks.built_stream(load_config(tiny_config(source={"dataset": "digits", "classes": [0, 1 + i]})))
    assert shared_tasks.stream_key(cfg) not in shared_tasks._BUILT and len(shared_tasks._BUILT) == shared_tasks.KEEP
