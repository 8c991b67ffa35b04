"""DeepSpeed's C++ ops and their build locks: built once, in a folder of this environment, never waited on forever.

On first use DeepSpeed builds C++ ops (on CPU `deepspeed_shm_comm`) with torch's cpp_extension, under a lock file
`<extensions dir>/<op>/lock`. A build killed halfway (a worker killed during a first run, two environments taking turns
on one shared folder) leaves the lock behind, and torch then waits on it in `FileBaton.wait` forever: no message, no
timeout. So:

* the ops are built into a folder private to the Python environment (`<sys.prefix>/torch_extensions`, unless
  TORCH_EXTENSIONS_DIR says otherwise), by `make setup` (`build_ops()`) or on first use;
* before DeepSpeed starts, every lock there is waited on for at most FORGETLESS_BUILD_LOCK_WAIT_S seconds (default
  300; a build takes about a minute), counted from the lock's creation, and then reported with its path and the fix.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import get_default_build_root

from forgetless.console import say
from forgetless.errors import ConfigError

LOCK_FILE = "lock"


def private_extensions_dir() -> Path:
    return Path(sys.prefix) / "torch_extensions"


def use_private_extensions_dir() -> str:
    """Point torch's extension builds at this environment's own folder (unless the user chose one), built by this
    environment's own ninja."""
    use_environment_ninja()
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(private_extensions_dir()))


def use_environment_ninja() -> None:
    """Put this environment's `ninja` (the pip package DeepSpeed depends on) first on this process's PATH.

    torch runs whichever `ninja` PATH finds first, and ninja 1.11 (e.g. /usr/bin/ninja) and 1.12+ (the pip package)
    record a build's command lines under different hashes: a process with the environment activated and one without
    (a Ray worker started from another shell, a test run and a CLI run) each found the other's build out of date and
    rebuilt the op, 1-2 minutes inside a worker's start, with the other workers waiting on its lock."""
    own = Path(sys.executable).parent
    if not (own / "ninja").is_file():
        return
    entries = os.environ.get("PATH", "").split(os.pathsep)
    if entries and entries[0] == str(own):
        return
    os.environ["PATH"] = os.pathsep.join([str(own), *entries])


def extensions_dir() -> Path:
    """Where torch builds extensions now (its own rule: TORCH_EXTENSIONS_DIR, else a per-Python folder in the cache)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_{accelerator}"


def present_locks() -> list[Path]:
    root = extensions_dir()
    return sorted(root.glob(f"*/{LOCK_FILE}")) if root.is_dir() else []


def stale_lock_message(lock: Path, age: float) -> str:
    return (f"DeepSpeed's C++ op build lock {lock} is {age:.0f}s old and no build removed it: a build was interrupted "
            f"and left it behind, and every run would wait on it forever. Fix: make sure no other run is building "
            f"(`ps aux | grep ninja`), then `rm {lock}` (and build the ops once: `make setup`)")


def wait_for_build_locks(timeout: float | None = None, poll: float = 1.0) -> None:
    """Wait for the op build locks of this environment to go away, at most `timeout` seconds after each was created;
    a lock older than that is stale: ConfigError with its path and the fix."""
    timeout = float(os.environ.get("FORGETLESS_BUILD_LOCK_WAIT_S", "300")) if timeout is None else timeout
    for lock in present_locks():
        said = False
        while True:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                break  # the build finished (or was cleaned up)
            if age >= timeout:
                raise ConfigError(stale_lock_message(lock, age))
            if not said:
                say(f"waiting for DeepSpeed's C++ op build lock {lock} (another process is building the op; at most "
                    f"{timeout - age:.0f}s more, FORGETLESS_BUILD_LOCK_WAIT_S={timeout:g})")
                said = True
            time.sleep(min(poll, max(0.0, timeout - age)))


def build_ops() -> None:
    """Build the CPU ops DeepSpeed needs now, once, into this environment's folder (`make setup`)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    use_private_extensions_dir()
    wait_for_build_locks()
    # deferred: DeepSpeed picks its accelerator when first imported, after DS_ACCELERATOR is set above
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and builder.is_compatible():
        builder.load()
    say(f"DeepSpeed ops built in {extensions_dir()}")

