"""One seam per library's internals: every use of a private name of Ray, DeepSpeed, MLflow, torch or CPython lives in
one module here, and nowhere else in forgetless (an import-linter contract and tests/test_architecture.py check it).

Each seam states the versions it was written and tested for (`SUPPORTED`). Importing a seam never raises: where the
installed version is outside that range or a private name is missing, the seam takes the library's public path and
says once per process, in one line, which version it found and what gets slower. `FORGETLESS_PUBLIC_PATHS=1` turns
every seam off (the public paths run; tests/test_public_paths.py runs the e2e core that way). docs/architecture.md,
"Library seams", lists each seam, its range and what its public path costs.
"""
from __future__ import annotations

import os
import re
from importlib import metadata
from typing import Callable

from forgetless.console import say

# Set to 1 to run every library's public path instead of the internals the seams use (e.g. to tell whether a problem
# comes from a seam). Read per call, so a process that sets it before it starts Ray passes it on to every worker.
PUBLIC_PATHS_VARIABLE = "FORGETLESS_PUBLIC_PATHS"


def public_paths() -> bool:
    """Whether the user turned every seam off (FORGETLESS_PUBLIC_PATHS=1)."""
    return os.environ.get(PUBLIC_PATHS_VARIABLE, "") not in ("", "0")


def version_tuple(version: str) -> tuple[int, ...]:
    """'2.60.0rc1' -> (2, 60, 0); '2.13.0+cpu' -> (2, 13, 0)."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def in_range(version: str, low: str, below: str) -> bool:
    """Whether `version` is >= `low` and < `below` (release numbers only)."""
    return version_tuple(low) <= version_tuple(version) < version_tuple(below)


def installed_version(distribution: str) -> str:
    """The installed version of a distribution, read from its metadata (nothing is imported); "0" if absent."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "0"


class Seam:
    """One library's internals as forgetless uses them: usable (`active()`) when the installed version is in the
    range the seam was written for, `probe()` finds the private names (called once, on first use: a seam's import
    imports nothing of its library, which may be slow to import or, as DeepSpeed, must be imported later), and the
    user did not ask for the public paths."""

    def __init__(self, library: str, distribution: str, low: str, below: str, slower: str,
                 probe: Callable[[], bool] = lambda: True):
        self.library, self.slower, self.probe = library, slower, probe
        self.version = installed_version(distribution)
        self.supported = f">={low},<{below}"
        self.in_range = in_range(self.version, low, below)
        self._usable: bool | None = None
        self._said = False

    def usable(self) -> bool:
        """In range and its private names found (whatever the switch says)."""
        if self._usable is None:
            try:
                self._usable = self.in_range and bool(self.probe())
            except Exception:  # noqa: BLE001 - a private name that moved: ImportError, AttributeError, ...
                self._usable = False
        return self._usable

    def active(self) -> bool:
        """Whether to take the private path; the first time in a process it is not, one line says why (switched off,
        outside the range, a name missing) and what gets slower."""
        if public_paths():
            self._say_once(f"{PUBLIC_PATHS_VARIABLE}=1: using {self.library} {self.version}'s public path")
            return False
        usable = self.usable()
        if not usable:
            self._say_once(f"{self.library} {self.version} is outside the range forgetless's seam was tested for "
                           f"({self.supported}): using its public path instead" if not self.in_range else
                           f"{self.library} {self.version} lacks an internal forgetless's seam uses: using its public "
                           f"path instead")
        return usable

    def _say_once(self, why: str) -> None:
        if not self._said:
            self._said = True
            say(f"{why} ({self.slower})")
