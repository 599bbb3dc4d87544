"""A full disk never truncates a file silently: on a 1 MB tmpfs every write lands whole or
raises an error naming the file and "no space left", leaving the previous version and no temp
file; the sweep's callback keeps its evaluations and says so once; leftovers are cleaned."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
from pyarrow import fs as pafs
from ray import tune

from iwae_model.checkpoint import save_checkpoint
from iwae_model.files import WriteError, held_folder, remove_abandoned_folders, write_atomically
from sweep.columns import RESULTS
from sweep.evaluation_callback import EvaluateAsTrialsFinish
from sweep.evaluation_registry import IN_THIS_DRIVER
from sweep.folder import write_spec
from sweep.live import LiveView
from sweep.results import PER_IMAGE_SCHEMA, read_evaluated, read_results, write_results, write_table
from sweep.space import parse_space
from sweep.storage import StorageFull, check_space, clean_partial_files, filesystem_and_path


@pytest.fixture
def disk(tmp_path):
    """A 1 MB tmpfs, unmounted afterwards."""
    folder = tmp_path / "disk"
    folder.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)]
    mounted = subprocess.run(command, capture_output=True, text=True) if shutil.which("mount") else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip(f"mounting a 1 MB tmpfs needs root and mount(8): {mounted and mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: a file pyarrow still holds open


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.rglob(".*"))


def assert_no_space_error(error: pytest.ExceptionInfo, path: str) -> None:
    assert str(error.value).startswith(f"{path}: not written") and "no space left" in str(error.value), error.value


@pytest.mark.parametrize("kind", ["sweep storage", "pyarrow local"])
def test_a_parquet_file_too_large_for_the_disk_raises_and_keeps_the_previous_one(disk, kind):
    # Before: write_table returned, and results.parquet was 1,044,480 bytes without its footer.
    filesystem = filesystem_and_path(str(disk))[0] if kind == "sweep storage" else pafs.LocalFileSystem()
    path = f"{disk}/sweep/results/results.parquet"
    write_results([{**dict.fromkeys(RESULTS.arrow().names), "trial_name": "before"}], path, filesystem)
    large = pa.table({"x": np.random.default_rng(0).random(300_000)})  # 2.4 MB of incompressible floats
    with pytest.raises(WriteError) as error:
        write_table(large, path, filesystem)
    assert_no_space_error(error, path)
    assert read_results(path).column("trial_name").to_pylist() == ["before"]
    assert leftovers(disk) == []


def test_a_checkpoint_too_large_for_the_disk_raises_and_keeps_the_previous_one(disk):
    path = disk / "run" / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "weights": torch.zeros(1000)})
    with pytest.raises(WriteError) as error:
        save_checkpoint(path, {"epoch": 2, "weights": torch.zeros(500_000)})  # 2 MB
    assert_no_space_error(error, str(path))
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert leftovers(disk) == []


def test_ray_s_checkpoint_upload_to_a_full_sweep_storage_raises_and_leaves_no_truncated_file(disk, tmp_path):
    # Ray uploads a checkpoint folder with pyarrow's copy_files through the sweep's filesystem, in
    # 64 MB chunks. Before: it returned, leaving checkpoint.pt cut short ("failed finding central
    # directory").
    filesystem, storage = filesystem_and_path(str(disk))
    upload = {"destination_filesystem": filesystem, "chunk_size": 64 * 1024 * 1024}
    staging = tmp_path / "staging"
    staging.mkdir()
    torch.save({"epoch": 1, "weights": torch.zeros(1000)}, staging / "checkpoint.pt")
    trial = f"{storage}/sweep/trial"
    pafs.copy_files(str(staging), f"{trial}/checkpoint_000000", **upload)
    torch.save({"epoch": 2, "weights": torch.zeros(500_000)}, staging / "checkpoint.pt")
    with pytest.raises(WriteError) as error:
        pafs.copy_files(str(staging), f"{trial}/checkpoint_000001", **upload)
    assert_no_space_error(error, f"{trial}/checkpoint_000001/checkpoint.pt")
    assert torch.load(f"{trial}/checkpoint_000000/checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not Path(f"{trial}/checkpoint_000001/checkpoint.pt").exists()
    assert leftovers(disk) == []


def test_a_trial_that_found_the_storage_full_stops_the_sweep_with_what_to_do(local_ray, disk):
    # Before: the sweep ended "2 of 2 trial(s) did not finish ... Nothing is lost: continue with
    # the same command plus --resume", or "no finished trial with a checkpoint to evaluate".
    path = disk / "sweep" / "trial" / "checkpoint.pt"
    write = ray.remote(write_atomically)  # in a worker, as a trial writes its checkpoint
    with pytest.raises(ray.exceptions.RayTaskError) as trial_error:
        ray.get(write.remote(path, lambda out: out.write(b"\0" * 2_000_000)))
    check_space([None, RuntimeError("a trial's own error")], f"{disk}/sweep")
    with pytest.raises(StorageFull) as error:
        check_space([None, trial_error.value], f"{disk}/sweep")
    assert str(error.value).startswith(
        f"{path}: not written, no space left on --storage (the sweep folder {disk}/sweep)"
    )
    assert "Free space there, then continue with the same command plus --resume" in str(error.value)


def evaluated(trial: str) -> tuple[dict, dict]:
    """A finished evaluation's (results row, per-image columns), as an evaluation task returns them."""
    row = {
        **dict.fromkeys(RESULTS.arrow().names),
        "trial_id": trial,
        "trial_name": f"vae_{trial}",
        "evaluation_id": f"evaluation_{trial}",
        "test_nll": 90.0,
        "test_nll_se": 0.5,
        "eval_k": 50,
        "eval_images": 1000,
    }
    images = np.arange(1000)
    per_image = {name: row.get(name) for name in PER_IMAGE_SCHEMA.names}
    per_image.update(image=images, nll=images * 0.5, ess=images * 1.0, pareto_k=images * 0.1)
    return row, per_image


def fill(path: Path) -> None:
    """`path` written until the disk holding it has no space left."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(descriptor, b"\0" * 65536):
            pass
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(descriptor)


def test_the_evaluations_callback_on_a_full_disk_keeps_its_evaluations_and_says_so_once(
    local_ray, disk, tmp_path, capsys
):
    # Before: each step wrote trials.parquet first, failed, and never collected the evaluation:
    # "an evaluation failed (OSError: [Errno 28] ...)" at every step, the evaluation left running.
    filesystem, storage = filesystem_and_path(str(disk))
    folder = f"{storage}/sweep"
    write_spec(folder, filesystem, parse_space({"name": "sweep", "experiments": [{"k": 1}]}, "<test>"), "/data")
    callback = EvaluateAsTrialsFinish(folder, filesystem, LiveView())
    state = IN_THIS_DRIVER.of(folder, filesystem)
    elsewhere = tune.Checkpoint.from_directory(str(tmp_path))  # its TensorBoard events are not this sweep's
    try:
        fill(disk / "filler")
        for step, trial in enumerate(["t0", "t1", "t2"]):
            state.running[ray.put(evaluated(trial))] = (trial, elsewhere)
            callback.on_step_end(step, [])
            assert state.running == {}  # collected, though nothing could be written
        failures = [line for line in capsys.readouterr().out.splitlines() if "failed" in line]
        assert len(failures) == 1, failures
        assert f"writing the results failed: {folder}/results/trials.parquet: not written, no space left" in failures[0]

        (disk / "filler").unlink()  # space freed: the next evaluation's write holds the ones kept
        state.running[ray.put(evaluated("t3"))] = ("t3", elsewhere)
        callback.on_step_end(3, [])
    finally:
        IN_THIS_DRIVER.forget(folder)
    assert "failed" not in capsys.readouterr().out
    assert sorted(read_evaluated(folder, filesystem)) == ["t0", "t1", "t2", "t3"]
    assert leftovers(disk) == []


def test_a_resumed_sweep_s_temp_files_are_cleaned_and_nothing_else(tmp_path):
    sweep = tmp_path / "sweep"
    temps = [
        "results/.results.parquet.k2j3h4.partial",
        "results/..tmp-0f3a-results.parquet.x8d7s6.partial",
        "results/.tmp-0f3a-per_image.parquet",
        ".experiment_state-2026.json.a1b2c3.partial",
        "vae_L1_M1_K1_s0_00000/checkpoint_000001/.checkpoint.pt.q9w8e7.partial",
    ]
    kept = ["results/results.parquet", ".validate_storage_marker", "vae_L1_M1_K1_s0_00000/checkpoint_000000/x.pt"]
    for name in temps + kept:
        (sweep / name).parent.mkdir(parents=True, exist_ok=True)
        (sweep / name).write_bytes(b"x")
    filesystem, folder = filesystem_and_path(str(sweep))
    assert sorted(clean_partial_files(folder, filesystem)) == sorted(f"{folder}/{name}" for name in temps)
    assert sorted(p.relative_to(sweep).as_posix() for p in sweep.rglob("*") if p.is_file()) == sorted(kept)


def test_a_killed_process_s_temp_folder_is_removed_and_a_live_one_is_not(tmp_path, monkeypatch):
    # Ray trials write each checkpoint to a temp folder; a trial killed there left it (5 MB).
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    prefix = f"iwae_test_{uuid.uuid4().hex[:8]}_"
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import os, signal\nfrom iwae_model.files import held_folder\nwith held_folder({prefix!r}) as f:\n"
            f"    (f / 'checkpoint.pt').write_bytes(b'x')\n    os.kill(os.getpid(), signal.SIGKILL)",
        ],
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert killed.returncode == -signal.SIGKILL
    (abandoned,) = tmp_path.glob(f"{prefix}*")
    (tmp_path / f"{prefix}not_held").mkdir()  # not made by held_folder (another version's): left alone
    with held_folder(prefix) as live:
        (live / "checkpoint.pt").write_bytes(b"x")
        assert remove_abandoned_folders(prefix) == [abandoned]
        assert (live / "checkpoint.pt").exists() and not abandoned.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{prefix}not_held"]
