"""The one error type a user can fix by editing a config or a command line (the bottom layer: imports nothing)."""


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the field and the fix."""
