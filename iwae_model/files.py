"""Writing a local file whole or not at all, and temp folders a killed process leaves behind.

A full disk makes write(2) write fewer bytes than asked without an error, and callers such as
pyarrow and torch ignore the count: every file the project owns is therefore written through
`WholeFile`, which loops on short writes, fsyncs, checks the size and only then renames the
temp file onto the real name, or raises `WriteError` and removes the temp file."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import IWAEError

PARTIAL_SUFFIX = ".partial"  # a temp file being written, beside the file it becomes: .NAME.<random>.partial
HELD = "held"  # a held_folder: <temp dir>/<prefix><random>/held, made once its parent is locked


class WriteError(IWAEError, OSError):
    """A file not written whole: its previous version, if any, is left as it was. The message
    names the file, the cause and the fix; `filename` is the file, `errno` the cause's (ENOSPC:
    the disk is full)."""

    def __str__(self) -> str:
        return self.strerror


def umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _write_error(path: str, error: OSError) -> WriteError:
    """`error`, met writing `path`, as a WriteError that names the file, the cause and the fix."""
    cause = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        cause = f"{cause.lower()} in {os.path.dirname(path)} (free space there)"
    return WriteError(
        error.errno or errno.EIO, f"{path}: not written, {cause}; its previous version, if any, is intact", path
    )


class WholeFile(contextlib.AbstractContextManager):
    """A binary file written to a temp name beside `path` and renamed onto `path` when closed
    whole. A failed write (removing the temp file at once: pyarrow's copy_files leaves a stream
    whose write raised unclosed) or a size on disk other than the bytes written raises WriteError
    and leaves `path` as it was; an exception in its `with` block leaves `path` as it was too. `durable`: fsynced before
    the rename (not for a folder Ray copies, then deletes)."""

    def __init__(self, path: str | os.PathLike, durable: bool = True) -> None:
        self.path, self.durable = os.fspath(path), durable
        folder, name = os.path.split(self.path)
        self.written, self.closed = 0, True  # until the temp file exists: nothing to close
        self.error: WriteError | None = None  # the write that failed
        try:
            os.makedirs(folder or ".", exist_ok=True)
            self._fd, self.temp = tempfile.mkstemp(dir=folder or ".", prefix=f".{name}.", suffix=PARTIAL_SUFFIX)
        except OSError as error:
            raise _write_error(self.path, error) from None
        self.closed = False
        os.fchmod(self._fd, 0o666 & ~umask())  # a temp file is private; the file it becomes is not

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        """Nothing to flush: each write reaches the kernel before it returns."""

    def write(self, data) -> int:
        """All of `data` (a short write is continued), or WriteError."""
        if self.closed:
            raise self.error or ValueError(f"{self.path}: written after it was closed")
        view = memoryview(data).cast("B")
        size = view.nbytes
        try:
            while view:
                count = os.write(self._fd, view)
                if count == 0:  # nothing written and no error: the device took no more
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view, self.written = view[count:], self.written + count
        except OSError as error:
            self.error = _write_error(self.path, error)
            self._end(land=False)
            raise self.error from None
        return size

    def close(self) -> None:
        """Renamed onto `path` if written whole, else the temp file removed and WriteError."""
        if not self.closed:
            self._end(land=True)

    def _end(self, land: bool) -> None:
        self.closed = True
        try:
            if land:
                self._land()
        except OSError as error:
            land = False
            raise _write_error(self.path, error) from None
        finally:
            os.close(self._fd)
            if not land:
                os.unlink(self.temp)

    def _land(self) -> None:
        if self.durable:
            os.fsync(self._fd)
        size = os.fstat(self._fd).st_size
        if size != self.written:
            raise OSError(errno.EIO, f"{size} of {self.written} bytes reached the disk")
        os.replace(self.temp, self.path)

    def __exit__(self, kind, error, traceback) -> None:
        if not self.closed:
            self._end(land=error is None)
        if self.error is not None and isinstance(error, Exception) and error is not self.error:
            raise self.error from None  # the cause, not what the writer made of it (torch: "unexpected pos")

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            self.close()


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None], durable: bool = True) -> None:
    """`write(file)` into a WholeFile: a reader or a crash sees the previous file or the new one,
    never half of one, and a full disk raises WriteError. Not `durable`: not fsynced (a folder
    handed to Ray, which copies it, then deleted)."""
    with WholeFile(path, durable) as out:
        write(out)


@contextlib.contextmanager
def held_folder(prefix: str) -> Iterator[Path]:
    """A new empty folder in the temp dir, held by this process until the block ends, then
    removed. A process killed inside the block leaves it unheld, for `remove_abandoned_folders`.
    Held: its parent `<prefix><random>` is flock-ed, a lock the kernel releases when the process
    dies, whichever PID namespace looks at it (a PID can be reused, or another container's)."""
    parent = Path(tempfile.mkdtemp(prefix=prefix))
    descriptor = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        (parent / HELD).mkdir()  # from here on, an unlocked parent means a dead process
        yield parent / HELD
    finally:
        shutil.rmtree(parent, ignore_errors=True)
        os.close(descriptor)  # after the removal: no one takes the lock of a parent still there


def remove_abandoned_folders(prefix: str) -> list[Path]:
    """Remove the `held_folder`s of `prefix` whose process has died; returns them. One without
    its HELD folder (being made, or not made by held_folder) is left alone."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        if not os.path.isdir(folder / HELD):
            continue
        try:
            descriptor = os.open(folder, os.O_RDONLY)
        except OSError:  # removed meanwhile by its process, or not ours to open
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its process is alive
            continue
        else:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(descriptor)
    return removed
