"""Errors that scaleseg raises for bad input.

Each message names the file, key or value at fault and what to do about it; the CLI prints
the message alone (no traceback) for these, since they are the user's to fix, not bugs.
"""


class ScalesegError(Exception):
    """Base class: a problem with the user's input that the message explains."""


class ConfigError(ScalesegError, ValueError):
    """An unknown config key, a wrong type or an impossible value."""


class DataError(ScalesegError):
    """A missing, corrupt or inconsistent dataset file, or a label value out of range."""


class CheckpointError(ScalesegError):
    """A checkpoint that is missing, corrupt, or from another model."""
