"""A free TCP port, for the servers this project starts on a shared machine (an embedded Ray cluster's GCS, the
test and benchmark MLflow servers, a benchmark's DeepSpeed ranks). Kept free of Ray and torch imports so a
benchmark that runs without Ray can use it."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port free now on every interface: the OS picks it, so a port another process holds is never returned
    (the caller binds it soon after; a fixed or random port can already be taken by a run beside this one)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
