"""One driver per sweep folder (sweep.lock): real processes hold the lock, real `sweep.run`
processes are refused before anything runs, and a killed holder's lock is taken over."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import TINY_SPACE
from pyarrow import fs as pafs

from sweep.lock import LEASE_S, Lease, SweepLocked, driver_lock, lock_path
from sweep.run import main

REPO = Path(__file__).resolve().parent.parent

# A driver stand-in: takes the lock of sweep "same" in every storage named on its command line
# through sweep.lock, as sweep.run does, says so, and holds it until its stdin closes.
HOLDER = """
import sys
from contextlib import ExitStack
from sweep.lock import driver_lock
with ExitStack() as stack:
    for storage in sys.argv[1:]:
        stack.enter_context(driver_lock(storage, "same"))
    print("held", flush=True)
    sys.stdin.read()
"""


@contextmanager
def holder(*storages: str):
    """A real process holding sweep "same"'s lock in each storage; yields its Popen once it holds them."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, *storages],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()  # blocks until it holds every lock, or exits
        assert line == "held\n", process.communicate()[1]
        yield process
    finally:
        if process.poll() is None:
            process.stdin.close()
            process.wait(timeout=60)


def sweep_run(storage: str, *flags: str, space: Path, data_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sweep.run", "--space", str(space), "--storage", storage, "--name", "same", *flags]
        + ["--data-dir", str(data_dir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_second_driver_and_a_second_resume_are_refused_naming_the_holder(tmp_path, s3_storage):
    space = tmp_path / "same.yaml"
    space.write_text(yaml.safe_dump(TINY_SPACE))
    local, s3 = str(tmp_path / "store"), s3_storage("sweeps")
    # An empty data folder: a driver that went past the lock would stop at the data, before Ray,
    # with another message.
    no_data = tmp_path / "no-data"
    with holder(local, s3) as held:
        drivers = [
            sweep_run(local, space=space, data_dir=no_data),
            sweep_run(local, "--resume", space=space, data_dir=no_data),
        ]
        with pytest.raises(SystemExit) as on_s3:  # in this process, while those two start
            main(["--space", str(space), "--storage", s3, "--name", "same", "--data-dir", str(no_data)])
        named = f"is being run by another driver: PID {held.pid} on host {socket.gethostname()}, started "
        assert on_s3.value.code.startswith("error: the sweep 'same' " + named)
        assert "(its lock: iwae-bucket/sweeps/.same.lock)" in on_s3.value.code and "testing" not in on_s3.value.code
        for driver in drivers:
            stderr = driver.communicate(timeout=300)[1]
            assert driver.returncode == 1 and "error: the sweep 'same' " + named in stderr, stderr
            assert "Traceback" not in stderr and "MNIST" not in stderr
        assert not (tmp_path / "store" / "same").exists()
    assert held.returncode == 0, held.stderr.read()
    assert not Path(lock_path(local, "same")).exists()  # released and removed
    s3_fs, s3_lock = pafs.FileSystem.from_uri(s3_storage("sweeps/.same.lock"))
    assert s3_fs.get_file_info(s3_lock).type == pafs.FileType.NotFound


def test_a_killed_drivers_lock_is_taken_over_with_a_note_naming_it(tmp_path, s3_storage, capsys):
    local, s3 = str(tmp_path / "store"), s3_storage("killed")
    with holder(local, s3) as held:
        held.send_signal(signal.SIGKILL)
        held.wait(timeout=60)
    named = f"stopped without releasing it (PID {held.pid} on host {socket.gethostname()}, started "
    for storage in (local, s3):
        with driver_lock(storage, "same"):
            assert named in capsys.readouterr().err
    assert not Path(lock_path(local, "same")).exists()


def test_a_lease_is_refused_while_renewed_taken_over_when_not_and_lost_to_a_takeover(s3_storage, capsys):
    filesystem, folder = pafs.FileSystem.from_uri(s3_storage("leases"))
    filesystem.create_dir(folder, recursive=True)
    path = f"{folder}/.same.lock"

    def another_driver(heartbeat: float) -> None:
        lease = {"host": "elsewhere", "pid": 1, "started": "then", "token": "theirs", "heartbeat": heartbeat}
        with filesystem.open_output_stream(path) as stream:
            stream.write(json.dumps(lease).encode())

    mine = Lease(filesystem, path, "same")
    another_driver(heartbeat=time.time())
    with pytest.raises(SweepLocked, match="PID 1 on host elsewhere, started then"):
        mine.claim()
    another_driver(heartbeat=time.time() - LEASE_S - 1)  # its driver stopped renewing it
    mine.claim()
    assert "stopped without releasing it (PID 1 on host elsewhere" in capsys.readouterr().err
    assert mine.renew()
    another_driver(heartbeat=time.time())  # taken over, as if this driver had stalled
    assert not mine.renew()
    mine.release()  # not ours: left alone
    assert filesystem.get_file_info(path).type == pafs.FileType.File


def test_the_lock_is_reentrant_in_one_process_and_removed_when_released(tmp_path):
    storage = str(tmp_path)
    with driver_lock(storage, "same"):
        with driver_lock(storage, "same"):  # main, then run_sweep
            pass
        assert json.loads(Path(lock_path(storage, "same")).read_text())["pid"] == os.getpid()
    assert not Path(lock_path(storage, "same")).exists()
