"""Writing a local file whole or not at all."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None], durable: bool = True) -> None:
    """`write(file)` into a temp file beside `path`, fsync, then rename it into place: a reader or
    a crash sees the previous file or the new one, never half of one. Not `durable`: written in
    place (a folder handed to Ray, which copies it, then deleted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not durable:
        with path.open("wb") as out:
            write(out)
        return
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        os.fchmod(tmp.fileno(), 0o666 & ~umask())  # a temp file is private; the file it becomes is not
        write(tmp)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)
