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


def exit_with(error: IWAEError | str) -> NoReturn:
    """How every command-line tool ends on a user's error: `error: MESSAGE` on stderr, status 1,
    no traceback."""
    sys.exit(f"error: {error}")


def end_without_shutdown(ended: SystemExit) -> NoReturn:
    """End a command-line tool that only read files as `ended` says, without the interpreter's
    shutdown, where pyarrow, after a failed read, aborts about one run in 20 (status 134,
    "terminate called without an active exception"). Only for `__main__`: it ends the process."""
    code = ended.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
