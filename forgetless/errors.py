"""The one error type a user can fix by editing a config or a command line (the bottom layer: imports nothing)."""


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the field and the fix."""


class RunFailed(RuntimeError):
    """A run failed inside its workers after every check passed (something no preflight can know): the message is one
    line naming the run, the worker and the exception, and where the full traceback is (the run's failure.log)."""
