"""The filesystem Ray Tune writes a sweep to: a local folder's files appear whole or not at all.

Ray Tune rewrites its experiment and searcher state in place, from a background thread, each
time it saves (at every checkpoint when `checkpoints.keep` is 1). A driver killed mid-write left
a truncated file; Tune's restore then fails, logs it and silently restarts the experiment with an
empty configuration. Object stores (S3, GCS) already replace an object whole, so only a local
(or mounted shared) folder needs this."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from iwae_model.files import umask


class _WholeFile(io.FileIO):
    """A temp file beside `path`, renamed onto it when closed (pyarrow's copy_files leaves that to
    garbage collection: IOBase's finaliser closes); a write that failed leaves `path` as it was."""

    def __init__(self, path: str) -> None:
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)  # as LocalFileSystem's output streams do
        fd, self._temp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".partial")
        os.fchmod(fd, 0o666 & ~umask())  # a temp file is private; the file it becomes is not
        super().__init__(fd, "wb")
        self._path, self._failed = path, False

    def write(self, data) -> int:
        try:
            return super().write(data)
        except OSError:
            self._failed = True
            raise

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        if self._failed:
            os.unlink(self._temp)
        else:
            os.replace(self._temp, self._path)


class WholeFiles(pafs.FileSystemHandler):
    """pyarrow's LocalFileSystem whose output streams are whole files (see the module's doc)."""

    def __init__(self) -> None:
        self._local = pafs.LocalFileSystem()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WholeFiles)

    def __hash__(self) -> int:
        return hash(WholeFiles)

    def __reduce__(self) -> tuple:  # to the trial workers, which upload the checkpoints
        return WholeFiles, ()

    def get_type_name(self) -> str:
        return "local-whole-files"

    def normalize_path(self, path: str) -> str:
        return self._local.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._local.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._local.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._local.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self._local.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("iwae-sweep never deletes a filesystem's root folder")

    def delete_file(self, path: str) -> None:
        self._local.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._local.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self._local.copy_file(src, dest)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self._local.open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self._local.open_input_file(path)

    def open_output_stream(self, path: str, metadata: dict | None) -> pa.PythonFile:
        return pa.PythonFile(_WholeFile(path), mode="w")

    def open_append_stream(self, path: str, metadata: dict | None) -> pa.NativeFile:
        return self._local.open_append_stream(path)


def filesystem_and_path(location: str) -> tuple[pafs.FileSystem, str]:
    """A local path or a URI (s3://bucket/path?endpoint_override=...) as pyarrow's pair; a local
    path's filesystem writes whole files."""
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.PyFileSystem(WholeFiles()), str(Path(location).expanduser().resolve())


def is_local(filesystem: pafs.FileSystem) -> bool:
    return isinstance(filesystem, pafs.LocalFileSystem) or (
        isinstance(filesystem, pafs.PyFileSystem) and isinstance(filesystem.handler, WholeFiles)
    )
