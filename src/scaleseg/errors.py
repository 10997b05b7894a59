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


_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def user_message(exc: BaseException) -> str:
    """The text the CLI prints for a ScalesegError.

    An error raised in a DataLoader worker process reaches the main process re-created by PyTorch with the
    worker's whole traceback as its message ("Caught DataError in DataLoader worker process 0. Original
    Traceback ..."), which buries the file name under 20 lines; only the original message is kept."""
    text = str(exc)
    if _WORKER_TRACEBACK not in text:
        return text
    for prefix in (f"{type(exc).__module__}.{type(exc).__qualname__}: ", f"{type(exc).__qualname__}: "):
        at = text.rfind("\n" + prefix)
        if at >= 0:
            return text[at + 1 + len(prefix):].strip()
    return text
