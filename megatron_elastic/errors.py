"""Errors a user can cause and fix.

Every exception of type :class:`UserError` is turned by the command line into one line on stderr
and exit code 2, before any compute and with nothing written. Anything else is a bug.
"""


class UserError(ValueError):
    """Bad input from the user (config, pattern, checkpoint, data): the message names the fix."""


class ConfigError(UserError):
    """A configuration value is invalid or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint directory or file is missing, truncated or of an unsupported kind."""


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for messages: a value from a file may be huge (a
    100,000-element list, a megabyte string), and a message must stay one short line. Nested containers
    are abbreviated lazily, so this is cheap whatever the size."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxlong, short.maxother = 3, limit, 40, limit
    for name in ("maxtuple", "maxlist", "maxarray", "maxdict", "maxset", "maxfrozenset", "maxdeque"):
        setattr(short, name, 6)
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
