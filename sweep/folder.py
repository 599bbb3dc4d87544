"""A sweep folder, `<storage>/<name>`, as run, evaluate and query share it: its spec file
(`iwae_sweep.json`: the space and the data folder), Ray Tune's saved state and how to restore
it (mending a killed driver's), the trials' labels, and the best checkpoints the evaluation takes.
"""

from __future__ import annotations

import fnmatch
import json
import pickletools
from collections.abc import Iterable
from typing import Any

from pyarrow import fs as pafs
from ray import tune

from iwae_model import TrainConfig
from iwae_model.checkpoint import CheckpointError, load_checkpoint
from iwae_model.errors import IWAEError

from .results import search_columns, write_whole
from .space import SweepSpace
from .storage import filesystem_and_path, is_local
from .trainable import train_trial, trial_config

SPEC_FILE = "iwae_sweep.json"  # the sweep's space and data dir, written by sweep.run
STAGE_2 = "stage2"  # a `continue` stage's Tune experiment, inside the sweep folder
# The keys TrainConfig.label() shows (beta too, for CIWAE): a search's label adds the others it draws.
LABELLED = ("dataset", "objective", "layers", "m", "k", "estimator", "seed")


def trial_name(config: TrainConfig, searched: Iterable[str], trial_id: str | None) -> str:
    """The configuration's label; in a search, with the values drawn and the trial's number (Ray's
    random search) or id (a searcher's), e.g. ciwae_L1_M1_K64_b0.31_s0_lr0.00042_trial3, so that
    samples of one grid point stay apart."""
    label = config.label()
    if not searched:
        return label
    drawn = [
        key for key in sorted(searched) if key not in LABELLED and not (key == "beta" and config.objective == "ciwae")
    ]
    label += "".join(f"_{key}{_short(getattr(config, key))}" for key in drawn)
    if not trial_id:
        return label
    number = trial_id.rsplit("_", 1)[-1]
    return f"{label}_trial{int(number)}" if number.isdigit() else f"{label}_trial{trial_id}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


def trial_label(trial: Any) -> str:
    """`trial_name` of a Ray trial or result (anything with the trial config)."""
    trial_id = getattr(trial, "trial_id", None) or (getattr(trial, "metrics", None) or {}).get("trial_id")
    return trial_name(trial_config(trial.config), trial.config.get("search") or {}, trial_id)


def checkpoint_uri(checkpoint: tune.Checkpoint) -> str:
    filesystem = checkpoint.filesystem
    return checkpoint.path if is_local(filesystem) else f"{filesystem.type_name}://{checkpoint.path}"


def stage_storage(storage: str, name: str) -> str:
    """The storage location (path or URI, its query kept) of the experiments inside sweep `name`."""
    path, sep, query = storage.partition("?")
    return f"{path.rstrip('/')}/{name}{sep}{query}"


def best_checkpoint(result: tune.Result, metric: str) -> tune.Checkpoint:
    return result.get_best_checkpoint(metric, "max") or result.checkpoint


def _score(result: tune.Result, metric: str) -> float | None:
    """A trial's best value of `metric` over its kept checkpoints (its last report's without one)."""
    return max((m[metric] for _, m in result.best_checkpoints), default=result.metrics.get(metric))


def trial_rows(grids: list[tune.ResultGrid], space: SweepSpace) -> list[dict[str, Any]]:
    """Every trial as a trials.parquet row (results.TRIALS_SCHEMA), evaluated or not."""
    return [trial_row(result, space) for grid in grids for result in grid]


def trial_row(result: tune.Result, space: SweepSpace, status: str | None = None) -> dict[str, Any]:
    """A trial's trials.parquet row; `status` where the result does not tell (a running trial)."""
    config, epochs = trial_config(result.config), result.metrics.get("epoch", 0)
    if status is None:
        status = "failed" if result.error is not None else "finished" if epochs >= config.passes else "not finished"
    searched = sorted(space.search.distributions) if space.search else []
    return {
        "trial_id": result.metrics.get("trial_id"),
        "trial_name": trial_label(result),
        "status": status,
        "epochs": epochs,
        **search_columns(config, space.metric, searched),
        "rank_metric_value": _score(result, space.metric) if result.metrics else None,
    }


def trial_result(trial: Any) -> tune.Result:
    """A Ray Tune trial (as a callback gets it) as the Result its ResultGrid will hold: Tune
    builds those from the trial's checkpoint manager, which a Trial has no public accessor for."""
    kept = trial.run_metadata.checkpoint_manager.best_checkpoint_results
    return tune.Result(
        metrics={**trial.last_result, "config": trial.config},
        checkpoint=trial.checkpoint,
        error=None,
        path=trial.path,
        best_checkpoints=[(kept_result.checkpoint, kept_result.metrics) for kept_result in kept],
    )


def select_checkpoints(grids: list[tune.ResultGrid], space: SweepSpace) -> list[tuple[str, tune.Checkpoint]]:
    """(trial id, checkpoint) pairs: the best checkpoint of every finished trial by the space's
    metric (`best: each`), or of the `top` trials best by it (`best: top`). Never a test figure."""
    evaluation, metric = space.evaluation, space.metric
    chosen = []
    for result in (result for grid in grids for result in grid):
        if result.error is not None or result.checkpoint is None:
            continue
        best = best_checkpoint(result, metric)
        score = _score(result, metric)
        chosen.append((score, result.metrics["trial_id"], best))
    chosen.sort(key=lambda item: item[0], reverse=True)
    if evaluation.best == "top":
        chosen = chosen[: evaluation.top]
    return [(trial_id, checkpoint) for _, trial_id, checkpoint in chosen]


class SweepFolderError(IWAEError, ValueError):
    """A sweep folder that cannot be resumed or evaluated as it is; the message names it and the fix."""


def write_spec(experiment_path: str, filesystem: pafs.FileSystem, space: SweepSpace, data_dir: str) -> None:
    spec = json.dumps({"space": space.to_dict(), "data_dir": data_dir}, indent=1).encode()
    write_whole(spec, f"{experiment_path}/{SPEC_FILE}", filesystem)


def read_spec(experiment_path: str, filesystem: pafs.FileSystem) -> tuple[SweepSpace, str]:
    path = f"{experiment_path}/{SPEC_FILE}"
    try:
        with filesystem.open_input_stream(path) as stream:
            spec = json.loads(stream.read())
        return SweepSpace.from_dict(spec["space"]), str(spec["data_dir"])
    except FileNotFoundError:
        raise SweepFolderError(
            f"{experiment_path}: no {SPEC_FILE}, so this is not a sweep folder made by python -m "
            f"sweep.run (pass <storage>/<name>)"
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise SweepFolderError(
            f"{path}: damaged ({type(error).__name__}: {str(error)[:300]}). sweep.run writes it "
            f"when the sweep starts; restore it from a copy (the trials' checkpoints are not "
            f"affected)"
        ) from None


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
