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
