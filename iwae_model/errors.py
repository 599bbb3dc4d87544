"""The one base of the project's errors."""


class IWAEError(Exception):
    """An error a user can act on: its message names the file, field or value and the fix, so the
    command-line tools print it as it is, without a traceback. Each subclass also derives from the
    built-in error it is a kind of (ValueError for bad input, RuntimeError for a failed run)."""
