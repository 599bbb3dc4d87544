"""A driver killed mid-sweep (SIGKILL, with the local Ray it started) and resumed by a new driver
(in the test's process), from each state Ray Tune can leave: nothing lost, nothing run twice. One
kill serves every case: its folder is kept as it was left and laid back in place for each (Ray
Tune's state names absolute paths)."""

import json
import shutil
from pathlib import Path

import pytest
import ray
import torch
from conftest import (
    TINY_SPACE,
    assert_complete_history,
    kill_sweep_at_first_checkpoint,
    resume_in_process,
    trial_dirs,
)
from pyarrow import fs as pafs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from iwae_model import TrainConfig
from iwae_model.checkpoint import load_checkpoint
from sweep.results import read_results
from sweep.trials import NODES_FILE
from sweep.tune_state import saved_results

PASSES = 5  # killed after the first: passes left to lose, a checkpoint to delete
DRIVER_SPACE = {
    **TINY_SPACE,
    "name": "driver",
    "training": {**TINY_SPACE["training"], "passes": PASSES, "train_images": 2000},
}


@pytest.fixture(scope="module")
def killed_sweep(mnist_dir, tmp_path_factory) -> tuple[list[str], Path, Path]:
    """(the driver's command, the sweep folder, a copy of its storage as the kill left it)."""
    folder = tmp_path_factory.mktemp("killed")
    command, sweep_dir = kill_sweep_at_first_checkpoint(DRIVER_SPACE, folder, mnist_dir, "")  # work to lose
    shutil.copytree(folder / "store", folder / "as_killed", symlinks=True)
    return command, sweep_dir, folder / "as_killed"


@pytest.fixture
def own_ray():
    """A local Ray for one resume (the test may shut it down first): Ray Tune stages a trial's files
    in its Ray session's folder under the start time the sweep's state records, the same for
    every resume of the one kill."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def delete_checkpoints_the_state_names(sweep_dir: Path) -> None:
    """The state a driver killed between Ray Tune deleting an old checkpoint and saving its
    experiment state leaves: the saved state names a checkpoint that is gone, a newer one is there."""
    for result in saved_results(str(sweep_dir), pafs.LocalFileSystem()):
        if result.checkpoint is None:
            continue
        named = Path(result.checkpoint.path)
        if not named.exists():  # the kill itself fell in that instant
            continue
        if sorted(named.parent.glob("checkpoint_*"))[-1] == named:  # the newer one Tune had just registered
            number = int(named.name.split("_")[1]) + 1
            shutil.copytree(named, named.parent / f"checkpoint_{number:06d}")
        shutil.rmtree(named)


def as_written_on_a_gpu(sweep_dir: Path) -> list[Path]:
    """Every checkpoint of the sweep with its generator state in a CUDA generator's layout, as a
    trial that ran on a GPU leaves it; returns the trials that have one."""
    trials = []
    for checkpoint in sweep_dir.glob("*/checkpoint_*/checkpoint.pt"):
        state = torch.load(checkpoint, weights_only=True)
        state["rng"] = {"generator": torch.arange(16, dtype=torch.uint8), "device": "cuda"}
        torch.save(state, checkpoint)
        trials.append(checkpoint.parent.parent)
    return sorted(set(trials))


@pytest.mark.parametrize("tune_state", ["saved", "not saved yet", "names a deleted checkpoint", "written on a GPU"])
def test_a_killed_driver_is_resumed_with_nothing_lost(killed_sweep, tune_state, own_ray, capfd):
    # "not saved yet": Ray Tune writes tuner.pkl at once but its experiment state only at its
    # first sync; a driver killed before that left a folder whose
    # restore made a trial with an empty config, and the resumed sweep crashed.
    # "names a deleted checkpoint": killed between Tune deleting a checkpoint (checkpoints.keep)
    # and saving its state: restoring failed for good.
    command, sweep_dir, as_killed = killed_sweep
    shutil.rmtree(sweep_dir.parent)
    shutil.copytree(as_killed, sweep_dir.parent, symlinks=True)
    assert not (sweep_dir / "results").exists()
    if tune_state == "not saved yet":
        for path in [*sweep_dir.glob("basic-variant-state-*.json"), *sweep_dir.glob("experiment_state-*.json")]:
            path.unlink()
    if tune_state == "names a deleted checkpoint":
        delete_checkpoints_the_state_names(sweep_dir)
    moved = as_written_on_a_gpu(sweep_dir) if tune_state == "written on a GPU" else []
    # Resumed from those checkpoints: the trials whose checkpoint Tune's saved state names (the
    # kill can land after a trial's first checkpoint is written, before Tune saves its state:
    # that trial starts again from scratch, on the CPU, and nothing is reseeded).
    if moved:
        named = {
            Path(r.checkpoint.path).parent
            for r in saved_results(str(sweep_dir), pafs.LocalFileSystem())
            if r.checkpoint is not None
        }
        moved = [trial for trial in moved if trial in named]
    begun = trial_dirs(sweep_dir) if tune_state == "not saved yet" else []
    out, err = resume_in_process(command, capfd)
    ray.shutdown()  # as a driver's exit does, prints the trials' lines Ray held back as repeats
    err += capfd.readouterr().err
    assert ("stopped before Ray Tune first saved its state" in err) == bool(begun)
    if tune_state == "names a deleted checkpoint":  # (a kill can also land in that instant by itself)
        assert "continue from their newest checkpoint" in err
    assert "| layers | M | K | VAE | IWAE |" in out
    table = read_results(str(sweep_dir))
    assert sorted(table.column("trial_name").to_pylist()) == ["iwae_L1_M1_K3_s0", "vae_L1_M1_K1_s0"]
    assert table.column("epochs").to_pylist() == [PASSES, PASSES]
    for trial in set(trial_dirs(sweep_dir)) - set(begun):
        assert_complete_history(sorted(trial.glob("checkpoint_*"))[-1], passes=PASSES)
    # Resumed on the CPU from a GPU's checkpoint: same weights and position, a reseeded generator,
    # and the node record, Parquet, the trial's TensorBoard and its console line say from which
    # pass it is not bit-identical.
    reseeded_at = dict(zip(table.column("trial_name").to_pylist(), table.column("generator_reseeded_at").to_pylist()))
    assert bool(moved) == (tune_state == "written on a GPU")
    for trial in moved:
        last = sorted(trial.glob("checkpoint_*"))[-1]
        runs = json.loads((last / NODES_FILE).read_text())
        assert [run["generator_reseeded"] for run in runs] == [False, True]
        label = TrainConfig.from_dict(load_checkpoint(last)["config"]).label()
        assert reseeded_at[label] == runs[1]["first_epoch"]
        events = EventAccumulator(str(trial), size_guidance={"tensors": 0}).Reload()
        texts = [event.tensor_proto.string_val[0].decode() for event in events.Tensors("run/node/text_summary")]
        assert ["generator reseeded" in text for text in texts] == [False, True]
    assert err.count("resumed on cpu from a checkpoint written on cuda") == len(moved)
    if tune_state != "written on a GPU":
        assert set(reseeded_at.values()) == {None}
