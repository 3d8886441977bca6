"""Error types that the CLI turns into one-line messages.

UserError (and subclasses) mean bad input: the CLI prints `error: <message>` and exits 2.
Anything else is a run-time failure (exit 1).
"""


class UserError(Exception):
    """Bad input from the user: config, paths, data. Message must name the problem and the fix."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass
