"""The one base of the project's errors, and how a command-line tool ends on one."""

import os
import sys
from typing import NoReturn


class IWAEError(Exception):
    """An error a user can act on: its message names the file, field or value and the fix, so the
    command-line tools print it as it is, without a traceback. Each subclass also derives from the
    built-in error it is a kind of (ValueError for bad input, RuntimeError for a failed run)."""


class DeviceError(IWAEError, RuntimeError):
    """A device asked for that this machine does not have."""


def exit_with(error: IWAEError | str, finalize: bool = True) -> NoReturn:
    """How every command-line tool ends on a user's error: `error: MESSAGE` on stderr, status 1,
    no traceback. `finalize=False`, for a tool that only read files: the process ends without
    the interpreter's shutdown, where pyarrow, after a failed read, aborts about one run in 20
    (status 134, "terminate called without an active exception")."""
    if finalize:
        sys.exit(f"error: {error}")
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
