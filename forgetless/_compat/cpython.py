"""CPython internals forgetless uses, and their public path. Written and tested for CPython 3.10-3.13 (range below).

- `run_exit_handlers`: `atexit._run_exitfuncs()`, the step of the interpreter's exit that runs the atexit handlers
  (in order), so that the `forgetless` command can end with `os._exit` right after them, without the interpreter's
  teardown of every module (~1.6 s on 2 cores after the last line is printed; cli.entry). Public path: `sys.exit`,
  the interpreter's whole exit.
"""
from __future__ import annotations

import atexit
import platform

from forgetless._compat import Seam, in_range

LOW, BELOW = "3.10", "3.14"  # written for 3.11; _run_exitfuncs has been there since atexit became a C module


class _Python(Seam):
    """The interpreter's version is not a distribution's: read from `platform`."""

    def __init__(self):
        super().__init__("CPython", "python", LOW, BELOW, slower="each command's exit frees every module (~1.6 s)",
                         probe=lambda: platform.python_implementation() == "CPython"
                         and callable(getattr(atexit, "_run_exitfuncs", None)))
        self.version = platform.python_version()
        self.in_range = in_range(self.version, LOW, BELOW)


SEAM = _Python()


def run_exit_handlers() -> bool:
    """Run the atexit handlers now, as the interpreter's exit would; False (nothing run) on the public path, where the
    caller exits the normal way."""
    if not SEAM.active():
        return False
    atexit._run_exitfuncs()
    return True
