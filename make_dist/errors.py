"""Errors a user can act on: the CLI prints their message alone, no traceback."""


class UserError(Exception):
    """A problem in what the user asked for (a config, a file, a model name);
    the message says what is wrong and where."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used; the message names the key and file."""


class Interrupted(UserError):
    """Stopped by Ctrl-C or SIGTERM; the message says what was kept and how to resume."""


class RefusedFile(UserError):
    """A file that make-dist will not read as it stands: a checkpoint holding
    Python objects that could run code when loaded, say. The message names it."""


class DataError(UserError):
    """Training data from which no batch can be made (every shard unreadable,
    every sample corrupt); the message names the shards."""

    def __init__(self, message: str):
        # A DataLoader worker's error comes back as its type with the worker's
        # whole traceback as the message: keep the message.
        if message.startswith(f"Caught {type(self).__name__}"):
            message = message.rstrip().rpartition(f"{type(self).__name__}: ")[2]
        super().__init__(message)
