"""The filesystem Ray Tune writes a sweep to: a local folder's files appear whole or not at all.

Ray Tune rewrites its experiment and searcher state in place, from a background thread, each
time it saves (at every checkpoint when `checkpoints.keep` is 1). A driver killed mid-write left
a truncated file; Tune's restore then fails, logs it and silently restarts the experiment with an
empty configuration. Object stores (S3, GCS) already replace an object whole, so only a local
(or mounted shared) folder needs this.

A write that finds the disk full raises (iwae_model.files.WholeFile) rather than leaving a file
cut short; `check_space` turns such an error, in a trial or the driver, into the sweep's message
and fix, and `clean_partial_files` removes the temp files of writes that never finished."""

from __future__ import annotations

import errno
import uuid
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from iwae_model.errors import IWAEError
from iwae_model.files import PARTIAL_SUFFIX, WholeFile, WriteError, write_atomically

TEMP_PREFIX = ".tmp-"  # write_whole's temp object on an object store: .tmp-<hex>-NAME


class PassThrough(pafs.FileSystemHandler):
    """A pyarrow filesystem handler that hands every call to filesystem `base`: the part of a
    wrapping filesystem that changes nothing (subclasses override the streams they change)."""

    def __init__(self, base: pafs.FileSystem) -> None:
        self.base = base

    def normalize_path(self, path: str) -> str:
        return self.base.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.base.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.base.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.base.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.base.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.base.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("iwae-sweep never deletes a filesystem's root folder")

    def delete_file(self, path: str) -> None:
        self.base.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.base.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.base.copy_file(src, dest)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.base.open_input_stream(path, compression=None)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self.base.open_input_file(path)

    def open_output_stream(self, path: str, metadata: dict | None) -> pa.NativeFile:
        return self.base.open_output_stream(path, compression=None, metadata=metadata)

    def open_append_stream(self, path: str, metadata: dict | None) -> pa.NativeFile:
        return self.base.open_append_stream(path, compression=None, metadata=metadata)


class WholeFiles(PassThrough):
    """pyarrow's LocalFileSystem whose output streams are whole files (see the module's doc)."""

    def __init__(self) -> None:
        super().__init__(pafs.LocalFileSystem())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WholeFiles)

    def __hash__(self) -> int:
        return hash(WholeFiles)

    def __reduce__(self) -> tuple:  # to the trial workers, which upload the checkpoints
        return WholeFiles, ()

    def get_type_name(self) -> str:
        return "local-whole-files"

    def open_output_stream(self, path: str, metadata: dict | None) -> pa.PythonFile:
        return pa.PythonFile(WholeFile(path), mode="w")


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


def clean_partial_files(folder: str, filesystem: pafs.FileSystem) -> list[str]:
    """Remove the temp files that writes which never finished (a killed driver or trial, a full
    disk) left anywhere in sweep `folder`: WholeFile's `.NAME.<random>.partial` and an object
    store's `.tmp-<hex>-NAME`; returns their paths. Only while nothing writes the sweep (before
    a resumed sweep starts): a write in progress would lose its temp file."""
    selector = pafs.FileSelector(folder, allow_not_found=True, recursive=True)
    leftovers = [
        info.path
        for info in filesystem.get_file_info(selector)
        if info.type == pafs.FileType.File and _is_temp(info.base_name)
    ]
    for path in leftovers:
        filesystem.delete_file(path)
    return leftovers


def _is_temp(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) or (name.startswith(".") and name.endswith(PARTIAL_SUFFIX))


class StorageFull(IWAEError, RuntimeError):
    """A sweep's storage has no space left; the message names the file, the storage and the fix."""


def check_space(errors: Iterable[BaseException | None], folder: str) -> None:
    """Raise StorageFull if one of `errors` (trials' errors as Ray hands them, or a write's) is a
    write that found no space left on the storage of sweep `folder`."""
    for error in errors:
        if (full := _no_space(error)) is not None:
            raise StorageFull(
                f"{full.filename}: not written, no space left on --storage (the sweep folder {folder}). Free "
                f"space there, then continue with the same command plus --resume: finished trials and their "
                f"evaluations are kept, the others continue from their last whole checkpoint"
            )


def _no_space(error: BaseException | None) -> WriteError | None:
    """`error`, or the error it carries (Ray's RayTaskError: `cause`), if it is a write that found
    no space left."""
    while error is not None:
        if isinstance(error, WriteError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = getattr(error, "cause", None) or error.__cause__
    return None


def write_whole(data: bytes | pa.Buffer, path: str, filesystem: pafs.FileSystem) -> None:
    """`data` as the file `path`, whole or not at all: readers and a crash never see half a file,
    and a failed write (a full disk: WriteError) leaves the previous version. A local file through
    iwae_model.files.WholeFile; on an object store, which writes each object whole anyway, to a
    temp name then moved into place."""
    if is_local(filesystem):
        write_atomically(path, lambda out: out.write(data))
        return
    folder, name = path.rsplit("/", 1)
    filesystem.create_dir(folder, recursive=True)
    tmp = f"{folder}/{TEMP_PREFIX}{uuid.uuid4().hex}-{name}"
    with filesystem.open_output_stream(tmp) as out:
        out.write(data)
    filesystem.move(tmp, path)
