"""One driver per sweep folder: `sweep.run` holds `<storage>/.<name>.lock` for its whole life.

Two drivers on one sweep folder (two starts, or a second --resume while the first runs) train
the same trials into the same folders: the last writer's experiment state wins and the other's
trial folders are orphaned. The second driver is refused, naming the holder (host, PID, start).

Local and mounted shared folders: an exclusive `fcntl.flock` on the lock file, which the kernel
(or the NFS server) releases when its holder dies, however it dies. The file names its holder
while held and is removed on a clean release, so a file found on taking the lock is a holder
that died: its details are printed as recovered.

Object stores (s3://, gs://) have no lock, and pyarrow no conditional write: the lock is a
lease object naming its holder, renewed by a heartbeat. A lease is stale when its heartbeat is
older than LEASE_S, or at once when its holder ran on this host and its PID is gone. Taking one
is Fischer's timed mutual exclusion: read it, write ours within CLAIM_S of that read (slower:
refused, as the wait would not cover it), wait SETTLE_S (more than CLAIM_S), and keep it only if
it still says ours; of two drivers that both found it free, the earlier writer sees the later
one's lease and is refused. A driver whose heartbeat stalls past LEASE_S can lose its lease to
another; it stops (as Ctrl+C would) at its next heartbeat.
"""

from __future__ import annotations

import _thread
import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pyarrow import fs as pafs

from iwae_model.errors import IWAEError

from .storage import filesystem_and_path, is_local

CLAIM_S = 1.0  # the longest a lease's read-then-write may take; longer, and it is read again
SETTLE_S = 2.0  # the wait between writing a lease and checking it is still ours
HEARTBEAT_S = 30.0
LEASE_S = 180.0  # a lease not renewed for this long is a dead driver's (6 missed heartbeats)

_held: dict[str, int] = {}  # lock path: how many times this process holds it (run_sweep inside main)


class SweepLocked(IWAEError, RuntimeError):
    pass


def lock_path(storage: str, name: str) -> str:
    """The lock of sweep `name`, beside its folder: taking it creates nothing in the folder."""
    _, path = filesystem_and_path(storage)
    return f"{path.rstrip('/')}/.{name}.lock"


@contextmanager
def driver_lock(storage: str, name: str) -> Iterator[None]:
    """Hold sweep `name`'s lock in `storage` (a folder or a URI) for the block, or raise
    SweepLocked naming the driver that holds it. Reentrant in one process."""
    filesystem, _ = filesystem_and_path(storage)
    path = lock_path(storage, name)
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    hold = _flock if is_local(filesystem) else _lease
    with hold(filesystem, path, name):
        _held[path] = 1
        try:
            yield
        finally:
            del _held[path]


def this_driver() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a driver that has not yet written its details"
    return f"PID {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


def _parse(data: bytes) -> dict[str, Any] | None:
    """A lock's holder, or None where there is none or it is cut short (being written)."""
    try:
        holder = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _refused(name: str, holder: dict[str, Any] | None, path: str) -> SweepLocked:
    # The lock's path, not the storage: an object store's URI may carry its credentials.
    return SweepLocked(
        f"the sweep {name!r} is being run by another driver: {describe(holder)} (its lock: {path}). "
        f"Two drivers would train the same trials into the same folders. Wait for it to finish, or stop it and "
        f"continue with --resume; or start another sweep with --name"
    )


def _recovered(name: str, holder: dict[str, Any] | None, path: str) -> None:
    print(
        f"note: the sweep {name!r} was locked by a driver that stopped without releasing it ({describe(holder)}); "
        f"its lock {path} is taken over",
        file=sys.stderr,
    )


@contextmanager
def _flock(filesystem: pafs.FileSystem, path: str, name: str) -> Iterator[None]:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(os.pread(fd, 65536, 0))
            os.close(fd)
            raise _refused(name, holder, path) from None
        # The holder we waited on may have removed the file just before releasing it: a lock
        # on that removed file is no lock, so take the one at the path now.
        if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
            break
        os.close(fd)
    try:
        if left := os.pread(fd, 65536, 0):
            _recovered(name, _parse(left), path)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(this_driver()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):  # removed by hand meanwhile
            os.unlink(path)  # before the unlock: a driver that locks the old file then looks again
        os.close(fd)


def _read_lease(filesystem: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    try:
        with filesystem.open_input_stream(path) as stream:
            return _parse(stream.readall())
    except FileNotFoundError:
        return None


def _write_lease(filesystem: pafs.FileSystem, path: str, lease: dict[str, Any]) -> None:
    with filesystem.open_output_stream(path) as stream:
        stream.write(json.dumps(lease).encode())


def lease_stale(lease: dict[str, Any]) -> bool:
    """Whether a lease's driver is gone: no heartbeat for LEASE_S, or its PID dead on this host."""
    if time.time() - lease.get("heartbeat", 0) > LEASE_S:
        return True
    if lease.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(lease["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class Lease:
    """A driver's lease on an object store: taken by `claim`, renewed by `renew`."""

    def __init__(self, filesystem: pafs.FileSystem, path: str, name: str) -> None:
        self.filesystem, self.path, self.name = filesystem, path, name
        self.mine = {**this_driver(), "token": uuid.uuid4().hex}

    def claim(self) -> None:
        """Take the lease or raise SweepLocked naming its holder."""
        read_at = time.monotonic()
        lease = _read_lease(self.filesystem, self.path)
        if lease and not lease_stale(lease):
            raise _refused(self.name, lease, self.path)
        _write_lease(self.filesystem, self.path, {**self.mine, "heartbeat": time.time()})
        if time.monotonic() - read_at > CLAIM_S:  # the wait below would not cover another driver's claim
            self.release()
            raise SweepLocked(
                f"--storage: reading and writing the sweep's lease {self.path} took over "
                f"{CLAIM_S:g} s, too slow to take it safely; try again when the object store answers faster"
            )
        time.sleep(SETTLE_S)  # Fischer's wait: a claim made on the same reading lands before it ends
        now = _read_lease(self.filesystem, self.path)
        if not now or now.get("token") != self.mine["token"]:
            raise _refused(self.name, now, self.path)
        if lease:
            _recovered(self.name, lease, self.path)

    def renew(self) -> bool:
        """Refresh the heartbeat; False when another driver has taken the lease over."""
        lease = _read_lease(self.filesystem, self.path)
        if not lease or lease.get("token") != self.mine["token"]:
            return False
        _write_lease(self.filesystem, self.path, {**self.mine, "heartbeat": time.time()})
        return True

    def release(self) -> None:
        if (_read_lease(self.filesystem, self.path) or {}).get("token") == self.mine["token"]:
            self.filesystem.delete_file(self.path)


@contextmanager
def _lease(filesystem: pafs.FileSystem, path: str, name: str) -> Iterator[None]:
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    lease = Lease(filesystem, path, name)
    lease.claim()
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lease, stop), name="sweep-lease", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        lease.release()


def _heartbeat(lease: Lease, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            kept = lease.renew()
        except OSError as error:  # the store unreachable for a while: the lease lasts LEASE_S
            print(f"warning: could not renew the sweep's lease {lease.path}: {error}", file=sys.stderr)
            continue
        if not kept:
            print(
                f"error: the sweep {lease.name!r} lost its lease {lease.path} to another driver (this one's "
                f"heartbeat stopped for over {LEASE_S:g} s); stopping this driver as Ctrl+C would",
                file=sys.stderr,
            )
            _thread.interrupt_main()
            return
