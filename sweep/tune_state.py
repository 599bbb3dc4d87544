"""Ray Tune's saved state of a sweep: restoring it with errors that name the folder, checking it is
whole before Tune reads it, mending what a killed driver left, and the results grids it holds."""

from __future__ import annotations

import fnmatch
import json
import pickletools
from typing import Any

from pyarrow import fs as pafs
from ray import tune

from iwae_model.checkpoint import CheckpointError, load_checkpoint

from .folder import SPEC_FILE, STAGE_2, SweepFolderError, read_spec
from .ray_private import kept_checkpoint_results
from .storage import filesystem_and_path
from .trainable import train_trial
from .trials import trial_label


def restore_tuner(experiment_path: str, filesystem: pafs.FileSystem, trainable: Any, **options: Any) -> tune.Tuner:
    """Tuner.restore with an error that names the folder instead of Ray's traceback."""
    if not tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem):
        raise SweepFolderError(f"{experiment_path}: not a Ray Tune sweep folder (no experiment state there)")
    _check_state_whole(experiment_path, filesystem)
    try:
        return tune.Tuner.restore(experiment_path, trainable=trainable, storage_filesystem=filesystem, **options)
    except Exception as error:  # noqa: BLE001 -- Ray raises many types for a damaged experiment state
        raise _unreadable_state(experiment_path, error) from None


def saved_results(experiment_path: str, filesystem: pafs.FileSystem) -> tune.ResultGrid:
    """The sweep's results as its saved experiment state has them (Tuner.restore starts no trials)."""
    tuner = restore_tuner(experiment_path, filesystem, train_trial)
    try:
        return tuner.get_results()
    except Exception as error:  # noqa: BLE001 -- as in restore_tuner
        raise _unreadable_state(experiment_path, error) from None


# Tune restores the newest of each (by name). The grid's generator, a searcher's wrapper, the
# searcher and the callbacks each have their own file; all but the first are pickles.
_STATE_FILES = {
    "experiment_state-*.json": "json",
    "basic-variant-state-*.json": "pickle",
    "search_gen_state-*.json": "pickle",
    "searcher-state-*.pkl": "pickle",
    "callback-states-*.pkl": "pickle",
}


def _check_state_whole(experiment_path: str, filesystem: pafs.FileSystem) -> None:
    """Raise SweepFolderError if Tune's newest experiment or searcher state is cut short: Tune
    itself would log the failure and start the whole sweep again with an empty configuration."""
    names = [info.base_name for info in filesystem.get_file_info(pafs.FileSelector(experiment_path))]
    for pattern, kind in _STATE_FILES.items():
        if not (matching := fnmatch.filter(names, pattern)):
            continue
        path = f"{experiment_path}/{max(matching)}"
        with filesystem.open_input_stream(path) as stream:
            data = stream.readall()
        try:
            if kind == "json":
                json.loads(data)
            else:
                for _ in pickletools.genops(data):  # reads the opcodes, runs nothing
                    pass
        except ValueError as error:
            raise _unreadable_state(path, error) from None


def _unreadable_state(experiment_path: str, error: Exception) -> SweepFolderError:
    return SweepFolderError(
        f"{experiment_path}: Ray Tune cannot read this sweep's experiment state ({type(error).__name__}: "
        f"{str(error).strip()[:300]}); it was written by another Ray version or damaged. The trials' "
        f"checkpoints are intact; restore the folder from a copy, or start a new sweep with --name"
    )


def load_grids(location: str) -> list[tune.ResultGrid]:
    """A finished sweep's results, from a local path or a URI: the first stage's (another
    sweep's, for one made with --init-from-sweep), then the `continue` stage's if it ran."""
    filesystem, path = filesystem_and_path(location)
    spec = filesystem.get_file_info(f"{path}/{SPEC_FILE}").type == pafs.FileType.File
    if not tune.Tuner.can_restore(path, storage_filesystem=filesystem) and spec:
        space, _ = read_spec(path, filesystem)
        grids = [load_grids(space.init_from_sweep)[0] if space.init_from_sweep else saved_results(path, filesystem)]
    else:
        grids = [saved_results(path, filesystem)]
    if tune.Tuner.can_restore(f"{path}/{STAGE_2}", storage_filesystem=filesystem):
        grids.append(saved_results(f"{path}/{STAGE_2}", filesystem))
    return grids


def experiment_state_saved(experiment: str, filesystem: pafs.FileSystem) -> bool:
    """Whether Ray Tune has saved this sweep's experiment state (it writes tuner.pkl at once,
    the state only at its first sync)."""
    listing = filesystem.get_file_info(pafs.FileSelector(experiment, allow_not_found=True))
    return any(info.base_name.startswith("experiment_state-") for info in listing)


def recover_deleted_checkpoints(experiment: str, filesystem: pafs.FileSystem) -> list[str]:
    """Make a killed driver's saved state restorable again; return the trials it mended.

    Ray Tune deletes a trial's older checkpoint (checkpoints.keep) when a newer one arrives and
    saves its experiment state a moment later. A driver killed in between leaves a state that
    names the deleted checkpoint, and restoring that trial fails for good. Its newest intact
    checkpoint is put under the missing name: each checkpoint holds the run's whole history, so
    the trial continues from its newest pass, with nothing lost and nothing run twice."""
    mended = []
    for result in saved_results(experiment, filesystem):
        named = result.checkpoint
        if named is None or filesystem.get_file_info(named.path).type != pafs.FileType.NotFound:
            continue
        trial_dir = named.path.rstrip("/").rsplit("/", 1)[0]
        survivors = sorted(
            (
                info.path
                for info in filesystem.get_file_info(pafs.FileSelector(trial_dir))
                if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
            ),
            reverse=True,
        )
        for survivor in survivors:
            try:
                with tune.Checkpoint(survivor, filesystem).as_directory() as folder:
                    load_checkpoint(folder)
            except CheckpointError:  # half written when the driver died
                continue
            filesystem.create_dir(named.path, recursive=True)
            pafs.copy_files(survivor, named.path, source_filesystem=filesystem, destination_filesystem=filesystem)
            mended.append(f"{trial_label(result)} (from {survivor.rsplit('/', 1)[1]})")
            break
    return mended


def trial_result(trial: Any) -> tune.Result:
    """A Ray Tune trial (as a callback gets it) as the Result its ResultGrid will hold: Tune
    builds those from the trial's checkpoint manager, which a Trial has no public accessor for."""
    kept = kept_checkpoint_results(trial)
    return tune.Result(
        metrics={**trial.last_result, "config": trial.config},
        checkpoint=trial.checkpoint,
        error=None,
        path=trial.path,
        best_checkpoints=[(kept_result.checkpoint, kept_result.metrics) for kept_result in kept],
    )
