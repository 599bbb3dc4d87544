"""Which of Ray Tune's pickles in a sweep folder this user's own driver wrote.

A sweep folder comes from buckets and colleagues, and `--resume` hands Ray Tune its saved state:
`tuner.pkl`, the searcher's files and the cloudpickled trials inside `experiment_state-*.json`
are pickles, and unpickling one runs any code it holds. So whenever this driver gives Ray a
storage filesystem, it is a `SignedStorage`: each file Ray unpickles on a restore (UNPICKLED) is
signed as it is written, with a keyed digest (HMAC-SHA256, the key kept outside every sweep folder,
`key_file()`) in `NAME.hmac` beside it, and is refused when read unless it matches.

A write puts the new digest into `NAME.hmac` beside the digest of the file there now (if that
one is signed), and only then writes the file (whole: a local folder's files are replaced by a rename, an object store's
objects are written whole). A driver killed at any moment leaves a file that matches its
signature, the old one or the new one: there is no moment at which a resume would be refused.

A folder signed with another key (another user's, another machine's) is refused until its user
resumes it with `--trust-folder`, which signs its files as they are (`trust_folder`). Reading a
sweep (`sweep.evaluate`, `sweep.query`, `--init-from-sweep`) unpickles nothing and needs no
signature (`sweep.saved_trials`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import io
import json
import os
import pickletools
import secrets
import tempfile
import threading
from pathlib import Path

import pyarrow as pa
from pyarrow import fs as pafs

from iwae_model.errors import IWAEError

from .folder import SweepFolderError
from .storage import PassThrough

KEY_FILE_VARIABLE = "IWAE_SWEEP_KEY_FILE"  # the key's path, if not the default (tests use their own)
SIGNATURE = ".hmac"  # NAME.hmac beside each signed file: {"hmac_sha256": [hex digests]}

# What Ray Tune restores from a sweep folder: at the experiment's root the newest of each state file
# (the experiment state is JSON holding cloudpickled trials; the searcher's and the callbacks' files
# are pickles, two of them named .json), tuner.pkl; a failed trial's error.pkl, when Tune builds
# its results. `kind` is what the file is at the top: "json" or "pickle".
EXPERIMENT_STATE = "experiment_state-*.json"  # one per driver run, beside its NAME.hmac
STATE_FILES = {
    EXPERIMENT_STATE: "json",
    "basic-variant-state-*.json": "pickle",
    "search_gen_state-*.json": "pickle",
    "searcher-state-*.pkl": "pickle",
    "callback-states-*.pkl": "pickle",
}
UNPICKLED = ("tuner.pkl", "error.pkl", *STATE_FILES)


def cut_short(name: str, data: bytes) -> ValueError | None:
    """Why the state file `name` (one of STATE_FILES, which Ray Tune rewrites as it runs) holding
    `data` is not whole (empty, or cut mid-write), or None; None for any other file. Nothing is
    unpickled: a pickle's opcodes are read, never run."""
    kind = next((kind for pattern, kind in STATE_FILES.items() if fnmatch.fnmatchcase(name, pattern)), None)
    if kind is None:
        return None
    try:
        if kind == "json":
            json.loads(data)
        else:
            for _ in pickletools.genops(data):
                pass
    except ValueError as error:
        return error
    return None


class UntrustedState(SweepFolderError):
    """A file Ray Tune would unpickle that this user's driver did not sign."""


class SigningKeyError(IWAEError, PermissionError):
    """The signing key cannot be used as it is; the message names the file and the fix."""


def key_file() -> Path:
    """The signing key: $IWAE_SWEEP_KEY_FILE, else iwae-sweep/state.key in $XDG_CONFIG_HOME (~/.config)."""
    if path := os.environ.get(KEY_FILE_VARIABLE):
        return Path(path).expanduser()
    return Path(os.environ.get("XDG_CONFIG_HOME") or "~/.config").expanduser() / "iwae-sweep" / "state.key"


def user_key() -> bytes:
    """This user's signing key, made (mode 0600) the first time a driver needs it."""
    path = key_file()
    try:
        return _user_key(path)
    except OSError as error:  # a folder one cannot write, a key one cannot read, no hard links
        raise SigningKeyError(
            f"{path}: the key that signs your sweeps' Ray Tune state cannot be made or read "
            f"({error.strerror or error}); point {KEY_FILE_VARIABLE} at a file in a folder of yours on a "
            f"local disk"
        ) from None


def _user_key(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=".state.key.")  # mode 0600
        try:
            with os.fdopen(descriptor, "wb") as out:
                out.write(secrets.token_hex(32).encode())
                out.flush()
                os.fsync(out.fileno())
            os.link(temp, path)  # whole or not at all, and never over a key another driver just made
        except FileExistsError:
            pass
        finally:
            os.unlink(temp)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        mode = f"open to others (mode {info.st_mode & 0o777:o})"
        raise SigningKeyError(
            f"{path}: the key that signs your sweeps' Ray Tune state is "
            f"{'owned by another user' if info.st_uid != os.getuid() else mode}; whoever can read it can sign "
            f"a sweep folder that --resume then unpickles, and whoever can write it can replace it. Make it "
            f"yours alone (chmod 600), or delete it: a new one is made, and folders signed with the old one "
            f"then need --trust-folder once"
        )
    try:
        key = bytes.fromhex(path.read_text())
    except (ValueError, UnicodeDecodeError):
        key = b""
    if len(key) < 32:
        raise SigningKeyError(
            f"{path}: damaged (it should hold 64 hex digits). Delete it: a new one is made, and folders "
            f"signed with the old one then need --trust-folder once"
        )
    return key


def unpickled_by_ray(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in UNPICKLED)


def digest(path: str, data: bytes) -> str:
    """The file's keyed digest; its name is part of it, so a signed file cannot stand in for another."""
    name = path.rsplit("/", 1)[-1].encode()
    return hmac.new(user_key(), b"iwae-sweep state\0" + name + b"\0" + data, hashlib.sha256).hexdigest()


def _signed_digests(filesystem: pafs.FileSystem, path: str) -> list[str]:
    """The digests `path`'s signature holds ([] if it has none, or one that is not ours to read)."""
    if filesystem.get_file_info(path + SIGNATURE).type != pafs.FileType.File:
        return []
    with filesystem.open_input_stream(path + SIGNATURE, compression=None) as stream:
        try:
            digests = json.loads(stream.readall()).get("hmac_sha256")
        except (ValueError, UnicodeDecodeError, AttributeError):
            return []
    return [d for d in digests if isinstance(d, str)] if isinstance(digests, list) else []


def _sign(filesystem: pafs.FileSystem, path: str, digests: list[str]) -> None:
    with filesystem.open_output_stream(path + SIGNATURE, compression=None) as out:
        out.write(json.dumps({"hmac_sha256": digests}).encode())


def check_signed(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Raise UntrustedState unless `data`, the content of `path`, matches the file's signature."""
    signed = _signed_digests(filesystem, path)
    mine = digest(path, data)
    if any(hmac.compare_digest(mine, other) for other in signed):
        return
    why = (
        f"it does not match its signature ({path}{SIGNATURE}): it was changed after it was signed, or "
        f"signed with another key (another user's, or yours on another machine)"
        if signed
        else f"it has no signature ({path}{SIGNATURE})"
    )
    raise UntrustedState(
        f"{path}: not resumed, {why}. Ray Tune unpickles this file to resume the sweep, and a pickle can "
        f"run any code, so --resume restores only the state that your own driver wrote and signed with "
        f"your key ({key_file()}). If you trust this folder (it is yours from another machine or "
        f"account, or a colleague's you trust), resume it with --trust-folder, which signs its state with "
        f"your key. Its results can be read without trusting it: python -m sweep.query, python -m "
        f"sweep.evaluate and --init-from-sweep unpickle nothing from a sweep folder"
    )


def _read(filesystem: pafs.FileSystem, path: str) -> bytes:
    with filesystem.open_input_stream(path, compression=None) as stream:
        return stream.readall()


def _unpickled_files(folder: str, filesystem: pafs.FileSystem) -> list[str]:
    selector = pafs.FileSelector(folder, allow_not_found=True, recursive=True)
    return sorted(
        info.path
        for info in filesystem.get_file_info(selector)
        if info.type == pafs.FileType.File and unpickled_by_ray(info.base_name)
    )


def check_state_signed(folder: str, filesystem: pafs.FileSystem) -> None:
    """Raise UntrustedState, naming the file, unless every file Ray Tune unpickles anywhere in
    sweep `folder` (its stages' state, the trials' error.pkl) is signed: before anything is
    unpickled or changed."""
    for path in _unpickled_files(folder, filesystem):
        check_signed(filesystem, path, _read(filesystem, path))


def trust_folder(folder: str, filesystem: pafs.FileSystem) -> list[str]:
    """Sign, as they are now, the files Ray Tune unpickles anywhere in sweep `folder` (--trust-folder);
    returns their paths."""
    signed = _unpickled_files(folder, filesystem)
    for path in signed:
        _sign(filesystem, path, [digest(path, _read(filesystem, path))])
    return signed


class _Signer(PassThrough):
    """`base` with the files Ray unpickles signed as they are written and checked as they are read;
    every other file passes through untouched."""

    def __init__(self, base: pafs.FileSystem) -> None:
        super().__init__(base)
        self._writer = _writing_in_the_calling_thread(base)
        self._lock = threading.Lock()  # Ray uploads files from several threads
        self._landed: dict[str, str] = {}  # path: digest of what this process wrote there

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Signer) and other.base.equals(self.base)

    def __hash__(self) -> int:
        return hash((_Signer, self.base.type_name))

    def land(self, path: str, data: bytes, metadata: dict | None) -> None:
        """The signature first, holding the new digest beside the one of what is there now; then the
        file. Killed in between (or the file's write failing), the old file still matches."""
        with self._lock:
            new = digest(path, data)
            _sign(self._writer, path, [new, *(d for d in self._there(path) if d != new)])
            with self._writer.open_output_stream(path, compression=None, metadata=metadata) as out:
                out.write(data)
            self._landed[path] = new

    def _there(self, path: str) -> list[str]:
        """The digest of the file at `path` now, if it is signed (an unsigned one stays unsigned)."""
        if path in self._landed:  # this process wrote it
            return [self._landed[path]]
        if self.base.get_file_info(path).type != pafs.FileType.File:
            return []
        there = digest(path, _read(self.base, path))
        return [there] if there in _signed_digests(self.base, path) else []

    def verified(self, path: str) -> pa.Buffer:
        data = _read(self.base, path)
        check_signed(self.base, path, data)
        return pa.py_buffer(data)  # what was checked, not the file read again

    def get_type_name(self) -> str:
        return f"signed-{self.base.type_name}"

    def open_input_stream(self, path: str) -> pa.NativeFile:
        if unpickled_by_ray(path):
            return pa.BufferReader(self.verified(path))
        return super().open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        if unpickled_by_ray(path):
            return pa.BufferReader(self.verified(path))
        return super().open_input_file(path)

    def open_output_stream(self, path: str, metadata: dict | None) -> pa.NativeFile:
        if unpickled_by_ray(path):
            return pa.PythonFile(_Landing(self, path, metadata), mode="w")
        return super().open_output_stream(path, metadata)


def _writing_in_the_calling_thread(filesystem: pafs.FileSystem) -> pafs.FileSystem:
    """`filesystem`, or for S3 the same bucket without background writes. Ray uploads with
    copy_files, whose copies run on Arrow's IO threads and call the handler there; a background
    write waits for a free IO thread, and with as many signed files as IO threads (8) in one
    upload, every one of them waited in the handler (measured: hung)."""
    if isinstance(filesystem, pafs.S3FileSystem):
        _, (options,) = filesystem.__reduce__()  # the constructor's arguments, as pyarrow pickles it
        return pafs.S3FileSystem(**{**options, "background_writes": False})
    return filesystem


class _Landing(io.BytesIO):
    """A signed file as Ray writes it: kept in memory (Ray's state files are small), landed on close."""

    def __init__(self, signer: _Signer, path: str, metadata: dict | None) -> None:
        super().__init__()
        self.signer, self.path, self.metadata = signer, path, metadata

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue()
            super().close()
            # Ray Tune rewrites its state in its staging folder in place while an earlier upload
            # may still be copying that folder: a copy cut short is dropped, the previous state
            # stays, and the next upload brings the new one whole.
            if cut_short(self.path.rsplit("/", 1)[-1], data) is None:
                self.signer.land(self.path, data, self.metadata)

    def __del__(self) -> None:  # a stream dropped unclosed (a failed copy) lands nothing
        super().close()


class SignedStorage(pafs.PyFileSystem):
    """A sweep's storage filesystem as this driver hands it to Ray Tune (see the module's doc).
    Pickled (into Tune's state, or to the trials, which write no signed file) it is the storage's
    own filesystem again: no sweep folder depends on this class, and no worker needs the key."""

    def __reduce__(self) -> tuple:
        return self.handler.base.__reduce__()


def signed_storage(filesystem: pafs.FileSystem) -> SignedStorage:
    return filesystem if isinstance(filesystem, SignedStorage) else SignedStorage(_Signer(filesystem))


def unsigned(filesystem: pafs.FileSystem) -> pafs.FileSystem:
    """The storage's own filesystem under a SignedStorage (a restored trial's checkpoints carry it)."""
    return filesystem.handler.base if isinstance(filesystem, SignedStorage) else filesystem
