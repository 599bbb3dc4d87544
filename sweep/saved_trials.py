"""A sweep's trials as Ray Tune Results, read from files that run no code when read: what
`sweep.evaluate`, `--init-from-sweep` and the end of a run know of a sweep.

Ray Tune's own way (`Tuner.restore`) unpickles `tuner.pkl` and the cloudpickled trials of its
experiment state, which a sweep folder from a bucket or a colleague could fill with code. Read
here instead, all of it JSON:
  experiment_state-*.json  the newest (Tune's choice too): each trial's id, folder, status and
                           config, from the plain JSON fields of its entry. The entry's
                           cloudpickled fields are left as the hex strings they are, never decoded.
  <trial>/result.json      one JSON line per report: the last is the trial's metrics; a report
                           that saved a checkpoint names its folder (`checkpoint_dir_name`)
  <trial>/checkpoint_*     the reported checkpoints still there are the ones Tune kept (it deletes
                           the others); each with its report's metrics
  <trial>/error.txt        why a trial Tune's state marks failed failed (error.pkl is a pickle)
Each checkpoint then loads with `torch.load(weights_only=True)` (iwae_model.checkpoint).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from typing import Any

from pyarrow import fs as pafs
from ray import tune

from .folder import SPEC_FILE, STAGE_2, SweepFolderError, read_spec
from .storage import filesystem_and_path
from .trust import EXPERIMENT_STATE
from .tune_state import check_state_whole, experiment_state_saved, unreadable_state

FINISHED = ("TERMINATED", "ERROR")  # Tune's statuses of a trial that will not run again


class TrialFailed(RuntimeError):
    """A trial Ray Tune's state marks failed for good: the last failure its error.txt records."""


@dataclass(frozen=True)
class SavedTrial:
    status: str  # Ray Tune's: TERMINATED, ERROR, or RUNNING, PAUSED, PENDING (unfinished)
    result: tune.Result


def read_trials(experiment: str, filesystem: pafs.FileSystem) -> list[SavedTrial]:
    """Every trial of the Tune experiment in folder `experiment` (on `filesystem`), in Tune's
    order, as its saved state and its files have it."""
    listing = filesystem.get_file_info(pafs.FileSelector(experiment, allow_not_found=True))
    if not (states := fnmatch.filter([info.base_name for info in listing], EXPERIMENT_STATE)):
        raise SweepFolderError(f"{experiment}: not a Ray Tune sweep folder (no experiment state there)")
    check_state_whole(experiment, filesystem)
    state_path = f"{experiment}/{max(states)}"
    try:
        entries = [json.loads(trial) for trial, _ in _json(filesystem, state_path)["trial_data"]]
        trials = [(entry["trial_id"], entry["relative_logdir"], entry["status"], entry["config"]) for entry in entries]
    except (KeyError, TypeError, ValueError) as error:
        raise unreadable_state(state_path, error) from None
    for trial_id, folder, status, config in trials:
        if not all(isinstance(value, str) for value in (trial_id, folder, status)) or not isinstance(config, dict):
            raise unreadable_state(state_path, TypeError(f"trial {trial_id!r}: a field of the wrong type"))
        if folder in ("", ".", "..") or "/" in folder:  # a trial's folder is one inside the sweep's
            raise unreadable_state(state_path, ValueError(f"trial {trial_id}: folder {folder!r}"))
    return [
        _trial(f"{experiment}/{folder}", filesystem, trial_id, status, config)
        for trial_id, folder, status, config in trials
    ]


def saved_grid(experiment: str, filesystem: pafs.FileSystem) -> list[tune.Result]:
    """The experiment's trials as Results, as a ResultGrid lists them."""
    return [trial.result for trial in read_trials(experiment, filesystem)]


def load_grids(location: str) -> list[list[tune.Result]]:
    """A finished sweep's results, from a local path or a URI: the first stage's (another
    sweep's, for one made with --init-from-sweep), then the `continue` stage's if it ran."""
    filesystem, path = filesystem_and_path(location)
    if filesystem.get_file_info(path).type == pafs.FileType.File:
        raise SweepFolderError(f"{path}: not a Ray Tune sweep folder (a file; give the sweep's folder)")
    spec = filesystem.get_file_info(f"{path}/{SPEC_FILE}").type == pafs.FileType.File
    if not experiment_state_saved(path, filesystem) and spec:
        space, _ = read_spec(path, filesystem)
        grids = [load_grids(space.init_from_sweep)[0] if space.init_from_sweep else saved_grid(path, filesystem)]
    else:
        grids = [saved_grid(path, filesystem)]
    if experiment_state_saved(f"{path}/{STAGE_2}", filesystem):
        grids.append(saved_grid(f"{path}/{STAGE_2}", filesystem))
    return grids


def _trial(folder: str, filesystem: pafs.FileSystem, trial_id: str, status: str, config: dict[str, Any]) -> SavedTrial:
    reports = _reports(folder, filesystem)
    # A report names its checkpoint's folder; the last report naming it (a restarted trial reports
    # its checkpoint's pass again) gives its metrics. Those still there are the kept ones.
    named = {name: report for report in reports if isinstance(name := report.get("checkpoint_dir_name"), str)}
    there = {
        info.base_name
        for info in filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        if info.type == pafs.FileType.Directory
    }
    kept = [(tune.Checkpoint(f"{folder}/{name}", filesystem), named[name]) for name in sorted(named) if name in there]
    result = tune.Result(
        metrics={"trial_id": trial_id, **(reports[-1] if reports else {}), "config": config},
        checkpoint=kept[-1][0] if kept else None,
        error=TrialFailed(_last_failure(folder, filesystem)) if status == "ERROR" else None,
        path=folder,
        best_checkpoints=kept,
        _storage_filesystem=filesystem,
    )
    return SavedTrial(status, result)


def _reports(folder: str, filesystem: pafs.FileSystem) -> list[dict[str, Any]]:
    """result.json's reports ([] before the first). A last line cut short (a driver killed while
    Tune appended it) is left out; any other line that is not a report is an error naming it."""
    path = f"{folder}/result.json"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return []
    lines = _read(filesystem, path).splitlines()
    reports = []
    for number, line in enumerate(lines, start=1):
        try:
            report = json.loads(line)
        except ValueError:
            report = None
        if isinstance(report, dict):
            reports.append(report)
        elif number < len(lines):
            raise SweepFolderError(
                f"{path}: damaged (line {number} is not one JSON object); Ray Tune writes one line per report "
                f"there. Restore the sweep folder from a copy (the trials' checkpoints are not affected)"
            )
    return reports


def _last_failure(folder: str, filesystem: pafs.FileSystem) -> str:
    """The last failure error.txt records (Tune appends one "Failure # N" block per failure)."""
    path = f"{folder}/error.txt"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return "failed (Ray Tune's state says so; it left no error.txt)"
    text = _read(filesystem, path).decode(errors="replace")
    return text[text.rfind("Failure # ") :].strip() or text.strip()


def _json(filesystem: pafs.FileSystem, path: str) -> Any:
    return json.loads(_read(filesystem, path))


def _read(filesystem: pafs.FileSystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as stream:
        return stream.readall()
