"""A driver and the existing Ray cluster it connects to run the same Ray, or the driver refuses in one line.

A cluster whose Ray differs from its driver's fails in ways no test has seen (objects, actors and Ray Train's
controller all cross the boundary). Ray itself refuses a driver of another version, but with a multi-line RuntimeError
that says nothing about the fix, and a Ray Client connection (ray://) lets RAY_IGNORE_VERSION_MISMATCH through. So
the driver (ray_cluster.init_ray, on connecting to an address; never for the embedded cluster it starts itself)
turns Ray's refusal into a ConfigError naming both versions and the fix, and, once connected, asks the cluster for
its version with public APIs only: one tiny task that returns `ray.__version__`, waited for a bounded time.
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import ray

from forgetless.console import say
from forgetless.errors import ConfigError

# How long to wait for the version task: it needs one worker process on the cluster (a second or so; longer while
# an autoscaler brings a node up, but the task asks for no CPU, so the head can run it). Past this the driver goes on
# unchecked, and says so.
VERSION_TASK_TIMEOUT_S = 60.0

# Ray's own refusal: "Version mismatch: The cluster was started with:\n    Ray: 2.51.0\n    Python: ..."
_RAY_MISMATCH = re.compile(r"Version mismatch: The cluster was started with:\s*Ray:\s*(\S+)", re.DOTALL)


def driver_ray_version() -> str:
    """The Ray version of this process."""
    return ray.__version__


def mismatch_message(address: str, cluster_version: str, driver_version: str) -> str:
    """The one-line refusal: both versions and the two ways out."""
    return (f"ray_address: the Ray cluster at {address} runs Ray {cluster_version}, this driver Ray {driver_version}; "
            f"they must be the same: run the driver from an environment with "
            f"ray=={cluster_version}, or start the cluster from an image built with this checkout's "
            f"requirements.lock (cluster/Dockerfile, Ray {driver_version})")


def cluster_version_in_ray_error(error: BaseException) -> str | None:
    """The cluster's Ray version named in Ray's own version-mismatch error, or None for any other error."""
    match = _RAY_MISMATCH.search(str(error))
    return match.group(1) if match else None


@ray.remote(num_cpus=0, max_retries=0)
def _ray_version_on_the_cluster() -> str:
    return ray.__version__


def cluster_ray_version(timeout_s: float = VERSION_TASK_TIMEOUT_S) -> str | None:
    """The Ray version a worker of the connected cluster runs, or None if no answer came within timeout_s."""
    ref = _ray_version_on_the_cluster.remote()
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        return None


def check_cluster_ray_version(address: str, timeout_s: float = VERSION_TASK_TIMEOUT_S) -> None:
    """Raise a one-line ConfigError when the connected cluster's Ray is not this driver's."""
    cluster_version = cluster_ray_version(timeout_s)
    if cluster_version is None:
        say(f"the Ray cluster at {address} did not say its Ray version within {timeout_s:.0f} s; going on unchecked "
            f"(this driver runs Ray {driver_ray_version()})")
        return
    if cluster_version != driver_ray_version():
        ray.shutdown()  # this process leaves the cluster it cannot use (a notebook can connect again)
        raise ConfigError(mismatch_message(address, cluster_version, driver_ray_version()))


@contextmanager
def same_ray_version(address: str, timeout_s: float = VERSION_TASK_TIMEOUT_S):
    """Around the `ray.init` that connects to an existing cluster: Ray's version-mismatch error becomes the one-line
    ConfigError, and a connection that Ray let through is checked with the version task."""
    try:
        yield
    except RuntimeError as error:
        cluster_version = cluster_version_in_ray_error(error)
        if cluster_version is None:
            raise
        ray.shutdown()  # whatever of the connection ray.init made before it refused
        raise ConfigError(mismatch_message(address, cluster_version, driver_ray_version())) from None
    check_cluster_ray_version(address, timeout_s)
