"""Ray Tune's saved state of a sweep: restoring it (only once its signature says this user's
driver wrote it: sweep.trust) with errors that name the folder, checking it is whole before Tune
reads it, and mending what a killed driver left. Reading a sweep's trials needs none of this:
sweep.saved_trials reads them without unpickling anything."""

from __future__ import annotations

import fnmatch
from typing import Any

from pyarrow import fs as pafs
from ray import tune

from iwae_model.checkpoint import CheckpointError, load_checkpoint

from .folder import SweepFolderError
from .ray_private import kept_checkpoint_results
from .trainable import train_trial
from .trials import trial_label
from .trust import (
    EXPERIMENT_STATE,
    STATE_FILES,
    SigningKeyError,
    UntrustedState,
    check_state_signed,
    cut_short,
    signed_storage,
    unsigned,
)


def restore_tuner(experiment_path: str, filesystem: pafs.FileSystem, trainable: Any, **options: Any) -> tune.Tuner:
    """Tuner.restore, only of a state this user's driver signed, with errors that name the folder
    instead of Ray's traceback. Tune gets a SignedStorage: it reads the signed files through it
    (what was checked, not the file read again) and signs the state it saves from then on."""
    if not tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem):
        raise SweepFolderError(f"{experiment_path}: not a Ray Tune sweep folder (no experiment state there)")
    check_state_whole(experiment_path, filesystem)
    check_state_signed(experiment_path, filesystem)
    try:
        return tune.Tuner.restore(
            experiment_path, trainable=trainable, storage_filesystem=signed_storage(filesystem), **options
        )
    except (UntrustedState, SigningKeyError):  # already named, with the fix
        raise
    except Exception as error:  # noqa: BLE001 -- Ray raises many types for a damaged experiment state
        raise unreadable_state(experiment_path, error) from None


def saved_results(experiment_path: str, filesystem: pafs.FileSystem) -> tune.ResultGrid:
    """The sweep's results as Ray Tune's saved (and signed) state has them: for what only that state
    says, such as the checkpoint it names. Tuner.restore starts no trials."""
    tuner = restore_tuner(experiment_path, filesystem, train_trial)
    try:
        return tuner.get_results()
    except (UntrustedState, SigningKeyError):  # already named, with the fix
        raise
    except Exception as error:  # noqa: BLE001 -- as in restore_tuner
        raise unreadable_state(experiment_path, error) from None


def check_state_whole(experiment_path: str, filesystem: pafs.FileSystem) -> None:
    """Raise SweepFolderError if Tune's newest experiment or searcher state is cut short: Tune
    itself would log the failure and start the whole sweep again with an empty configuration.
    Nothing is unpickled: a pickle's opcodes are read, never run."""
    names = [info.base_name for info in filesystem.get_file_info(pafs.FileSelector(experiment_path))]
    for pattern in STATE_FILES:
        if not (matching := fnmatch.filter(names, pattern)):
            continue
        name = max(matching)  # Tune restores the newest of each (by name)
        with filesystem.open_input_stream(f"{experiment_path}/{name}") as stream:
            if (error := cut_short(name, stream.readall())) is not None:
                raise unreadable_state(f"{experiment_path}/{name}", error)


def unreadable_state(experiment_path: str, error: Exception) -> SweepFolderError:
    return SweepFolderError(
        f"{experiment_path}: Ray Tune cannot read this sweep's experiment state ({type(error).__name__}: "
        f"{str(error).strip()[:300]}); it was written by another Ray or iwae-sweep version, or damaged. The "
        f"trials' checkpoints are intact; resume with the versions that started it, restore the folder from a "
        f"copy, or start a new sweep with --name"
    )


def experiment_state_saved(experiment: str, filesystem: pafs.FileSystem) -> bool:
    """Whether Ray Tune has saved this sweep's experiment state (it writes tuner.pkl at once,
    the state only at its first sync)."""
    if filesystem.get_file_info(experiment).type != pafs.FileType.Directory:  # a file, or nothing
        return False
    listing = filesystem.get_file_info(pafs.FileSelector(experiment))
    return any(fnmatch.fnmatchcase(info.base_name, EXPERIMENT_STATE) for info in listing)


def recover_deleted_checkpoints(experiment: str, filesystem: pafs.FileSystem) -> list[str]:
    """Make a killed driver's saved state restorable again; return the trials it mended.

    Ray Tune deletes a trial's older checkpoint (checkpoints.keep) when a newer one arrives and
    saves its experiment state a moment later. A driver killed in between leaves a state that
    names the deleted checkpoint (or one it was still copying into place), and restoring that
    trial fails for good. Its newest intact checkpoint is put under the name: each checkpoint
    holds the run's whole history, so the trial continues from its newest pass, with nothing lost
    and nothing run twice."""
    mended = []
    for result in saved_results(experiment, filesystem):
        named = result.checkpoint
        if named is None or _intact(named.path, filesystem):
            continue
        if filesystem.get_file_info(named.path).type == pafs.FileType.Directory:
            filesystem.delete_dir(named.path)  # the part the driver copied before it died
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
            if not _intact(survivor, filesystem):  # half written when the driver died
                continue
            filesystem.create_dir(named.path, recursive=True)
            pafs.copy_files(survivor, named.path, source_filesystem=filesystem, destination_filesystem=filesystem)
            mended.append(f"{trial_label(result)} (from {survivor.rsplit('/', 1)[1]})")
            break
    return mended


def _intact(checkpoint: str, filesystem: pafs.FileSystem) -> bool:
    if filesystem.get_file_info(checkpoint).type != pafs.FileType.Directory:
        return False
    try:
        with tune.Checkpoint(checkpoint, filesystem).as_directory() as folder:
            load_checkpoint(folder)
    except CheckpointError:
        return False
    return True


def trial_result(trial: Any) -> tune.Result:
    """A Ray Tune trial (as a callback gets it) as the Result its ResultGrid will hold: Tune
    builds those from the trial's checkpoint manager, which a Trial has no public accessor for.
    Its checkpoints are on the storage's own filesystem (a restored trial's carry the SignedStorage)."""
    kept = kept_checkpoint_results(trial)
    return tune.Result(
        metrics={**trial.last_result, "config": trial.config},
        checkpoint=_on_storage(trial.checkpoint),
        error=None,
        path=trial.path,
        best_checkpoints=[(_on_storage(kept_result.checkpoint), kept_result.metrics) for kept_result in kept],
    )


def _on_storage(checkpoint: tune.Checkpoint | None) -> tune.Checkpoint | None:
    return checkpoint and tune.Checkpoint(checkpoint.path, unsigned(checkpoint.filesystem))
