"""A driver refuses, in one line, an existing Ray cluster whose Ray is not its own (platform/driver/cluster_versions.py):
Ray's own refusal (its real message, made by Ray's check) becomes a ConfigError naming both versions and the fix; a
connected cluster is asked for its version by a task on a real Ray cluster, and a silent one is waited for a bounded
time only."""
from __future__ import annotations

import platform
import time

import pytest
import ray

from forgetless.errors import ConfigError
from forgetless.platform.driver import cluster_versions


def _rays_own_refusal(cluster_version: str) -> RuntimeError:
    """The error Ray raises in ray.init when the cluster was started with another Ray (made by Ray's own check, so
    that a change in its wording fails here rather than on a user's cluster)."""
    from ray._private.utils import check_version_info

    with pytest.raises(RuntimeError) as caught:
        check_version_info({"ray_version": cluster_version, "python_version": platform.python_version()}, "node x")
    return caught.value


def test_rays_version_mismatch_becomes_one_line_naming_both_versions_and_the_fix():
    with pytest.raises(ConfigError) as refused:
        with cluster_versions.same_ray_version("10.0.0.5:6379"):
            raise _rays_own_refusal("2.51.0")
    message = str(refused.value)
    assert "\n" not in message
    assert "Ray 2.51.0" in message and f"Ray {ray.__version__}" in message and "10.0.0.5:6379" in message
    assert "ray==2.51.0" in message and "requirements.lock" in message
    assert refused.value.__cause__ is None and refused.value.__suppress_context__


def test_other_connection_errors_pass_through_unchanged():
    error = RuntimeError("Failed to connect to GCS at 10.0.0.5:6379")
    assert cluster_versions.cluster_version_in_ray_error(error) is None
    with pytest.raises(RuntimeError, match="Failed to connect to GCS"):
        with cluster_versions.same_ray_version("10.0.0.5:6379"):
            raise error


@ray.remote(num_cpus=0, max_retries=0)
def _never_answers() -> str:
    time.sleep(60)
    return "never"


@pytest.mark.e2e
def test_a_cluster_that_does_not_answer_is_waited_for_a_bounded_time(ray_session, monkeypatch, capsys):
    monkeypatch.setattr(cluster_versions, "_ray_version_on_the_cluster", _never_answers)
    started = time.monotonic()
    cluster_versions.check_cluster_ray_version("a busy cluster", timeout_s=1.0)
    assert time.monotonic() - started < 10
    said = capsys.readouterr()
    assert "did not say its Ray version within 1 s; going on unchecked" in said.out + said.err


@pytest.mark.e2e
def test_a_connected_cluster_reports_its_version_and_a_different_one_is_refused(ray_session, monkeypatch):
    assert cluster_versions.cluster_ray_version() == ray.__version__
    cluster_versions.check_cluster_ray_version("this cluster")  # the same Ray: no error
    monkeypatch.setattr(cluster_versions, "driver_ray_version", lambda: "2.51.0")
    with pytest.raises(ConfigError, match=rf"runs Ray {ray.__version__}, this driver Ray 2\.51\.0;"):
        cluster_versions.check_cluster_ray_version("this cluster")
    assert not ray.is_initialized()  # refused: this process left the cluster (so this test runs last in its module)
