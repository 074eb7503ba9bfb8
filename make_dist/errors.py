"""Errors a user can act on: the CLI prints their message alone, no traceback."""


class UserError(Exception):
    """A problem in what the user asked for (a config, a file, a model name);
    the message says what is wrong and where."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used; the message names the key and file."""


class Interrupted(UserError):
    """Stopped by Ctrl-C or SIGTERM; the message says what was kept and how to resume."""
