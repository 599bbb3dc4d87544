"""Run a sweep: Ray Tune trains one model per configuration and seed, Ray tasks run the k=5000
evaluation on the best checkpoints (with `best: each`, each trial's once it finishes) and the
results are written as Parquet.

    python -m sweep.run [--space quick] [--storage ./sweeps] [--name NAME] [--resume] ...

The sweep folder `<storage>/<name>` holds one folder per trial (checkpoints; TensorBoard's
curves, sample and reconstruction images, evaluated figures and HParams session, one run per
trial), `iwae_sweep.json` and `results/results.parquet`. Look at it with
`tensorboard --logdir <storage>/<name>` and `python -m sweep.query <storage>/<name>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from pyarrow import fs as pafs
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from iwae_model import TrainConfig
from iwae_model.data import default_data_dir
from iwae_model.datasets import load_dataset
from iwae_model.errors import IWAEError, exit_with
from iwae_model.files import WriteError
from iwae_model.plugins import add_plugin_flag, load_plugin

from .cluster import check_gpus, check_storage_shared, init_ray, plugin_environment, storage_marker
from .evaluation import evaluate_sweep
from .evaluation_callback import EvaluateAsTrialsFinish
from .evaluation_jobs import best_checkpoint, checkpoint_uri
from .evaluation_registry import IN_THIS_DRIVER
from .folder import SPEC_FILE, STAGE_2, read_spec, stage_storage, write_spec
from .live import LiveView
from .lock import driver_lock
from .plan import dry_run
from .ray_private import TrialCurves
from .saved_trials import FINISHED, load_grids, read_trials
from .space import (
    DEFAULT_SPACE,
    FOLDER_NAME_RULE,
    Distribution,
    SettingError,
    SpaceError,
    SweepSpace,
    check_memory,
    is_folder_name,
    load_space,
    parse_tracker,
    resolve_space_path,
    shipped_spaces,
)
from .storage import check_space, clean_partial_files, filesystem_and_path
from .tables import print_results
from .trackers import check_tracker, tracker_callbacks, tracker_line
from .trainable import curves, train_trial
from .trials import trial_config, trial_label
from .trust import check_state_signed, key_file, signed_storage, trust_folder
from .tune_state import experiment_state_saved, recover_deleted_checkpoints, restore_tuner


class SweepInterrupted(IWAEError, RuntimeError):
    pass


def trainable(space: SweepSpace):
    return tune.with_resources(
        train_trial, {"cpu": space.resources.cpus_per_trial, "gpu": space.resources.gpus_per_trial}
    )


@dataclass(frozen=True)
class StageOptions:
    """How every stage of one sweep runs."""

    space: SweepSpace
    data_dir: str
    folder: str  # the sweep folder, on the storage's filesystem
    resume: bool = False
    max_concurrent: int = 0
    max_failures: int = 2
    callbacks: list[tune.Callback] | None = None  # extra Ray Tune callbacks, when a stage starts
    marker: dict[str, str] | None = None  # a local-path storage's marker (cluster.storage_marker)


@dataclass(frozen=True)
class Stage:
    """One stage's trials as the Tune experiment `storage`/`name`; a continued stage's trials each
    have their parent's checkpoint in `parents`, by label."""

    trials: list[TrainConfig]
    storage: str
    name: str
    parents: dict[str, tune.Checkpoint] | None = None


def search_domain(distribution: Distribution) -> Any:
    """A space file's distribution as Ray Tune's."""
    if distribution.kind == "choice":
        return tune.choice(list(distribution.values))
    return getattr(tune, distribution.kind)(*distribution.values)


def build_tuner(stage: Stage, options: StageOptions) -> tune.Tuner:
    space, parents = options.space, stage.parents
    search = None if parents else space.search  # a continued stage is a grid
    passes = max(t.passes for t in stage.trials)
    if search and "passes" in search.distributions:
        passes = max(passes, *search.distributions["passes"].values)
    filesystem, storage_path = filesystem_and_path(stage.storage)
    # A single grid point is a constant (Optuna takes no grid axis).
    train = (
        stage.trials[0].to_dict()
        if search and len(stage.trials) == 1
        else tune.grid_search([t.to_dict() for t in stage.trials])
    )
    searcher = None
    if search and search.algorithm == "optuna":
        searcher = OptunaSearch(seed=search.seed)  # metric and mode from TuneConfig
    elif search:
        searcher = BasicVariantGenerator(random_state=search.seed)
    max_concurrent = options.max_concurrent or (search.max_concurrent if search else None) or None
    view = LiveView()
    evaluate = [EvaluateAsTrialsFinish(options.folder, filesystem, view)] if space.evaluation.best == "each" else []
    tracking = tracker_callbacks(space, options.folder)  # --tracker's (MLflow, W&B), logged from this driver's node
    return tune.Tuner(
        trainable(space),
        param_space={
            "train": train,
            **({"search": {key: search_domain(d) for key, d in search.distributions.items()}} if search else {}),
            "data_dir": options.data_dir,
            "checkpoint_every": space.checkpoints.every,
            # Stage 2: each trial its own parent's checkpoint (an object, not a path, so that it is
            # read through the sweep's storage filesystem on any node).
            "init_checkpoint": tune.sample_from(lambda spec: parents[trial_label(spec)]) if parents else None,
            # A local-path storage's marker, checked by each trial on the node it lands on.
            "storage_marker": options.marker,
            # The plugins defining objectives, each loaded (and checked unchanged) by the trial.
            "plugins": list(space.plugins),
        },
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode="max",
            max_concurrent_trials=max_concurrent,
            search_alg=searcher,
            num_samples=search.samples if search else 1,
            scheduler=ASHAScheduler(
                time_attr="training_iteration", max_t=passes, grace_period=max(1, passes // 8), reduction_factor=3
            )
            if space.early_stopped
            else None,
            trial_name_creator=trial_label,
            trial_dirname_creator=lambda trial: f"{trial_label(trial)}_{trial.trial_id}",
            # A finished trial's worker process trains the next trial: no new process, no second
            # import of torch per trial. The trainable seeds everything it draws from its config.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=stage.name,
            storage_path=storage_path,
            storage_filesystem=signed_storage(filesystem),  # signs the state Tune unpickles on --resume
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=space.checkpoints.keep,
                checkpoint_score_attribute=space.metric,
                checkpoint_score_order="max",
            ),
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
            callbacks=[view, TrialCurves(curves), *evaluate, *tracking, *(options.callbacks or [])],
            verbose=0,  # LiveView replaces Tune's table
            # The trainable's own TensorBoard images live in its working dir: upload them with each checkpoint.
            sync_config=tune.SyncConfig(sync_artifacts=True),
        ),
    )


def fit_stage(stage: Stage, options: StageOptions) -> list[tune.Result]:
    """Train (or resume) one stage's trials; raise SweepInterrupted unless every trial finished or
    failed for good."""
    filesystem, storage_path = filesystem_and_path(stage.storage)
    experiment = f"{storage_path.rstrip('/')}/{stage.name}"
    if options.resume and experiment_state_saved(experiment, filesystem):
        if mended := recover_deleted_checkpoints(experiment, filesystem):
            print(
                f"note: the sweep stopped between Ray Tune deleting an old checkpoint and saving its state; "
                f"{', '.join(mended)} continue from their newest checkpoint",
                file=sys.stderr,
            )
        tuner = restore_tuner(experiment, filesystem, trainable(options.space), resume_errored=True)
    else:
        if options.resume and filesystem.get_file_info(experiment).type == pafs.FileType.Directory:
            # Tune restoring a folder with no experiment state makes a trial with an empty config.
            print(
                f"note: the sweep in {experiment} stopped before Ray Tune first saved its state (it does so "
                f"within seconds to a minute of starting), so its trials start again; the trial folders it had "
                f"begun are not used and can be deleted",
                file=sys.stderr,
            )
        tuner = build_tuner(stage, options)
    # Tune saves its state after each checkpoint once `checkpoints.keep` are kept, and warns
    # whenever two saves fall within 5 s: with short passes, every pass. Those saves are what keeps
    # a kill from losing anything, and cost little (the state is about 12 KB per trial).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    grid = tuner.fit()
    check_space((result.error for result in grid), options.folder)  # trials that found the storage full
    # Ctrl+C makes fit() return normally, and in this process the stopped trials then count as
    # terminated; the experiment state it saved on the way out still says which are not. Read back
    # as every read of a sweep is (sweep.saved_trials: no pickle), which also gives the checkpoints
    # on the storage's own filesystem, not the signing one Tune was handed.
    saved = read_trials(experiment, filesystem)
    behind = [
        f"{trial_label(t.result)} ({t.result.metrics.get('epoch', 0)}/{trial_config(t.result.config).passes} passes)"
        for t in saved
        if t.status not in FINISHED
    ]
    if behind:
        # Named by their status in that state too, not from this process's results, where
        # trials that finished after the last save had been counted but not named ("2 of 2
        # trial(s) did not finish: .").
        raise SweepInterrupted(
            f"{len(behind)} of {len(saved)} trial(s) did not finish: {', '.join(behind)}. Nothing is "
            f"lost: continue with the same command plus --resume"
        )
    return [trial.result for trial in saved]


def second_stage(space: SweepSpace, first: list[tune.Result]) -> tuple[list[TrainConfig], dict[str, tune.Checkpoint]]:
    """The stage-2 trials whose parents finished, each with its parent's best checkpoint (by
    validation bound, as the evaluation picks it) recorded in init_from."""
    best = {
        trial_label(result): best_checkpoint(result, space.metric)
        for result in first
        if result.error is None and result.checkpoint is not None
    }
    missing = sorted({child.init_label for child in space.continued} - set(best))
    if space.init_from_sweep and missing:
        raise SpaceError(
            f"--init-from-sweep {space.init_from_sweep}: it has no finished trial labelled "
            f"{', '.join(missing)} to continue (it has {', '.join(sorted(best)) or 'none'}); the space's "
            f"experiments must name that sweep's trials"
        )
    trials, checkpoints = [], {}
    for child in space.continued:
        if child.init_label not in best:
            print(
                f"note: {child.label()} is not trained: its first-stage parent {child.init_label} did not finish",
                file=sys.stderr,
            )
            continue
        trial = replace(child, init_from=checkpoint_uri(best[child.init_label]))
        trials.append(trial)
        checkpoints[trial.label()] = best[child.init_label]
    return trials, checkpoints


def count(space: SweepSpace) -> str:
    return f"{len(space.trials)} trials" + (f" and {len(space.continued)} continued" if space.continued else "")


def resumed_space(
    space: SweepSpace, asha: bool, experiment: str, filesystem: pafs.FileSystem, trust: bool
) -> tuple[SweepSpace, str]:
    """The sweep in folder `experiment` as it was started (its spec file) with `space`'s resources,
    and its data folder; refused where `space` asks for other trials, ASHA or tracker, or where
    Ray Tune's state is not signed by this user (`trust`: sign it as it is first)."""
    started, data_dir = read_spec(experiment, filesystem)
    if asha and not started.early_stopped:
        raise SpaceError(
            f"--asha: the sweep in {experiment} was started without it (or by a version that did not "
            f"record it), and a sweep's scheduler is fixed when it starts; resume without --asha, or "
            f"start a new sweep with --name"
        )
    space = space.with_asha() if started.asha else space
    if (started.trials, started.continued, started.init_from_sweep) != (
        space.trials,
        space.continued,
        space.init_from_sweep,
    ):
        raise SpaceError(
            f"--resume: the sweep in {experiment} was started from {started.source} ({count(started)}); "
            f"{space.source} defines other trials ({count(space)}). Resume with --space {started.source}, or "
            f"start a new sweep with --name"
        )
    if space.tracker and space.tracker != started.tracker:
        raise SpaceError(
            f"--tracker {space.tracker}: the sweep in {experiment} was started with "
            f"{started.tracker or 'no tracker'}, and its tracker is fixed when it starts; resume without "
            f"--tracker (and tracker: in the space file), or start a new sweep with --name"
        )
    if trust:
        signed = trust_folder(experiment, filesystem)
        print(
            f"note: --trust-folder: {len(signed)} file(s) of Ray Tune's state in {experiment} signed as "
            f"they are with your key ({key_file()}); --resume unpickles them from now on",
            file=sys.stderr,
        )
    check_state_signed(experiment, filesystem)  # both stages and every trial's, before anything changes
    clean_partial_files(experiment, filesystem)  # the temp files of writes a kill or a full disk cut short
    return replace(started, resources=space.resources), data_dir


def run_sweep(
    space: SweepSpace,
    storage: str,
    data_dir: str,
    resume: bool = False,
    max_concurrent: int = 0,
    asha: bool = False,
    max_failures: int = 2,
    wait_for_gpus: float = 0,
    callbacks: list[tune.Callback] | None = None,
    address: str | None = None,
    trust: bool = False,
) -> tuple[str, list[dict], list[str]]:
    """Train (or resume) every trial -- the first stage, then a `continue` stage from its best
    checkpoints -- evaluating each finished one as it finishes (`best: each`) or the best when
    all have (`best: top`); returns the Parquet path, its rows and the names of trials that
    failed for good. Holds the sweep's driver lock throughout (sweep.lock), and refuses a sweep
    that exists (unless `resume`) or cannot be resumed before it joins Ray: `address`, or a new
    local Ray unless one is initialised (see `cluster.init_ray`). `asha`: stop poor trials
    early (SweepSpace.with_asha). `callbacks`: extra Ray Tune callbacks (used when a stage
    starts, not on resume). On resume the trials, evaluation settings, ASHA and data folder are
    the ones the sweep was started with (its iwae_sweep.json); only `space.resources` is taken
    anew, and the evaluations already made are kept. A resume restores only Ray Tune state this
    user's driver signed (sweep.trust); `trust` (--trust-folder) first signs the folder's as it is."""
    with driver_lock(storage, space.name):  # before the "already exists" check, for the driver's life
        space = space.with_asha() if asha else space
        filesystem, storage_path = filesystem_and_path(storage)
        experiment = f"{storage_path.rstrip('/')}/{space.name}"
        exists = any(
            tune.Tuner.can_restore(path, storage_filesystem=filesystem)
            for path in (experiment, f"{experiment}/{STAGE_2}")
        )
        begun = filesystem.get_file_info(f"{experiment}/{SPEC_FILE}").type == pafs.FileType.File
        if exists and not resume:
            raise SpaceError(
                f"a sweep named {space.name!r} already exists in {storage}: pass --resume to continue it, "
                f"or --name to start another"
            )
        if resume and not (exists or begun):
            raise SpaceError(f"--resume: no sweep named {space.name!r} in {storage} to resume")
        if resume:
            space, data_dir = resumed_space(space, asha, experiment, filesystem, trust)
        check_tracker(space.tracker, storage)
        init_ray(address, plugin_environment(space.plugins))
        marker = storage_marker(experiment, filesystem)
        check_storage_shared(marker)  # before the spec, so a refused sweep can start again under its name
        check_gpus(space.resources.gpus_per_trial, space.resources.eval_gpus, wait_for_gpus)
        write_spec(experiment, filesystem, space, data_dir)  # on resume, with the resources it resumes with
        IN_THIS_DRIVER.forget(experiment)  # an earlier run's evaluations in this process: the files say what is done
        options = StageOptions(space, data_dir, experiment, resume, max_concurrent, max_failures, callbacks, marker)
        if space.init_from_sweep:  # stage 1 is that sweep's, finished: its trials are only read
            grids = load_grids(space.init_from_sweep)[:1]
        else:
            grids = [fit_stage(Stage(space.trials, storage, space.name), options)]
        if space.continued:
            trials, checkpoints = second_stage(space, grids[0])
            if trials:
                grids.append(
                    fit_stage(Stage(trials, stage_storage(storage, space.name), STAGE_2, checkpoints), options)
                )
        failed = [result for grid in grids for result in grid if result.error is not None]
        for result in failed:
            print(f"trial {Path(result.path).name} failed for good: {result.error}", file=sys.stderr)
        try:
            path, rows = evaluate_sweep(grids, experiment, filesystem, space, data_dir)
        except WriteError as error:
            check_space([error], experiment)
            raise
        return path, rows, [Path(result.path).name for result in failed]


def storage_location(storage: str) -> str:
    """--storage as run_sweep takes it: a URI, or an absolute folder (made if missing), refused
    when it or a folder above it is a file."""
    if "://" in storage:
        return storage
    path = Path(storage).expanduser().resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise SpaceError(
            f"--storage {storage}: {existing} is a file, not a folder; give a folder (made if missing) or a URI "
            f"such as s3://bucket/sweeps"
        )
    return str(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sweep.run",
        description="Train a sweep of VAE / IWAE / MIWAE / CIWAE / PIWAE / VR / RWS models (or your own "
        "objectives, --plugin) with Ray Tune, evaluate the best checkpoints with k=5000 importance samples and "
        "write Parquet results. With no arguments: the quick sweep "
        "(about 4 minutes on a 2-core laptop) on a local Ray.",
        epilog="Then: tensorboard --logdir STORAGE/NAME, and python -m sweep.query STORAGE/NAME.",
    )
    parser.add_argument(
        "--space",
        default=DEFAULT_SPACE,
        help=f"a search-space YAML file, or the name of one in search_spaces/ ({', '.join(shipped_spaces())})",
    )
    parser.add_argument("--name", help="the sweep's folder name under --storage (default: the space file's name)")
    add_plugin_flag(parser)
    parser.add_argument(
        "--storage",
        default="sweeps",
        help="where sweeps live: a local folder (default ./sweeps) or a URI such as s3://bucket/path",
    )
    parser.add_argument("--address", help="Ray cluster to join ('auto': the one `ray up` made); default: a local Ray")
    parser.add_argument(
        "--data-dir",
        help="data folder, every dataset's files (default: $IWAE_DATA_DIR, then ~/.cache/iwae-sweep/data); "
        "every node must have it at this path, or have internet to download it",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep: finished trials are kept, running ones continue from "
        "their last checkpoint, failed ones are retried",
    )
    parser.add_argument(
        "--trust-folder",
        action="store_true",
        help="with --resume: sign this sweep folder's Ray Tune state with your key, so that a sweep written by "
        "another user, machine or key can be resumed; only for a folder you trust, since resuming unpickles "
        "that state (see docs/files.md#what-to-trust)",
    )
    parser.add_argument(
        "--max-concurrent", type=int, default=0, help="at most N trials at once (default: as resources allow)"
    )
    parser.add_argument(
        "--asha",
        action="store_true",
        help="stop unpromising trials early (ASHA, ranking by valid_ll where the trials differ in objective, K, "
        "M or beta, else by the validation bound); fixed when the sweep starts",
    )
    parser.add_argument("--cpus-per-trial", type=float, help="override the space file's resources.cpus_per_trial")
    parser.add_argument(
        "--gpus-per-trial", type=float, help="override resources.gpus_per_trial (fractions share a GPU)"
    )
    parser.add_argument("--eval-gpus", type=float, help="override resources.eval_gpus (GPUs per evaluation)")
    parser.add_argument(
        "--max-failures", type=int, default=2, help="restarts of a crashed trial from its last checkpoint"
    )
    parser.add_argument(
        "--init-from-sweep",
        metavar="SWEEP_DIR",
        help="with a space that has a `continue` section: take its first stage from this finished "
        "sweep (path or URI; the trials the space's experiments name) instead of training it, "
        "and train only the continued stage here",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the space and print every trial, the evaluation work and an estimated wall "
        "time (from seconds of calibration on this machine); trains nothing, writes nothing",
    )
    parser.add_argument(
        "--wait-for-gpus",
        type=float,
        metavar="SECONDS",
        help="when the cluster has fewer GPUs than a trial asks for, ask the autoscaler for them and "
        "wait this long before giving up (default: 600 with --address, where GPU workers start "
        "on demand; 0 on a local Ray)",
    )
    parser.add_argument(
        "--tracker",
        metavar="mlflow[=URI]|wandb",
        help="also log the trials to MLflow or Weights & Biases (needs the mlflow or wandb extra): one run per "
        "trial, its evaluation included; mlflow alone keeps the store in the sweep folder, mlflow=URI logs to "
        "that tracking server; wandb logs to your W&B account, or with WANDB_MODE=offline to files in the sweep "
        "folder for wandb sync (overrides the space file's tracker:; docs/trackers.md)",
    )
    args = parser.parse_args(argv)
    if args.max_concurrent < 0 or args.max_failures < 0 or (args.wait_for_gpus or 0) < 0:
        parser.error("--max-concurrent, --max-failures and --wait-for-gpus must be >= 0")
    if args.trust_folder and not args.resume:
        parser.error("--trust-folder: only with --resume (it signs the state of a sweep to resume)")
    if args.wait_for_gpus is None:
        args.wait_for_gpus = 600 if args.address else 0
    return args


def resumed_plugins(args: argparse.Namespace) -> None:
    """On --resume: load the plugins the sweep was started with, from its spec (checked unchanged),
    before its space file, whose experiments may use their objectives, is read."""
    try:
        raw = yaml.safe_load(resolve_space_path(args.space).read_text(encoding="utf-8"))
    except (SpaceError, OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # load_space names the problem
    name = args.name or (raw.get("name") if isinstance(raw, dict) else None) or Path(args.space).stem
    if not is_folder_name(name):
        return  # refused by name later
    filesystem, root = filesystem_and_path(storage_location(args.storage))
    experiment = f"{root.rstrip('/')}/{name}"
    if filesystem.get_file_info(f"{experiment}/{SPEC_FILE}").type == pafs.FileType.File:
        read_spec(experiment, filesystem)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Tune's newer console output prints a header (with a TensorBoard path into Ray's session
    # folder, not the sweep's) even when silenced; the classic one is silent at verbose=0.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    try:
        if args.resume:
            resumed_plugins(args)
        flagged = [load_plugin(spec).record() for spec in args.plugin]
        space = load_space(args.space)
        space = replace(space, plugins=tuple({r["module"]: r for r in (*space.plugins, *flagged)}.values()))
        overrides = {
            key: getattr(args, key)
            for key in ("cpus_per_trial", "gpus_per_trial", "eval_gpus")
            if getattr(args, key) is not None
        }
        if args.name is not None and not is_folder_name(args.name):
            raise SpaceError(f"--name {args.name!r}: {FOLDER_NAME_RULE}: the sweep's folder, right under --storage")
        try:
            resources = replace(space.resources, **overrides)
        except SettingError as error:
            named = {key: value for key, value in overrides.items() if error.key.endswith(f".{key}")} or overrides
            flags = " ".join(f"--{key.replace('_', '-')} {value:g}" for key, value in named.items())
            raise SpaceError(f"{flags}: {error}") from None
        space = replace(space, name=args.name or space.name, resources=resources)
        if args.tracker is not None:
            space = replace(space, tracker=parse_tracker(args.tracker, "--tracker"))
        if overrides:
            check_memory(space)  # again, on the devices the resources now give
        if args.init_from_sweep:
            if not space.continued:
                raise SpaceError(
                    f"--init-from-sweep: {space.source} has no `continue` section, so there is nothing to "
                    f"continue; add one (see search_spaces/burda2016_table2.yaml)"
                )
            parent = args.init_from_sweep
            space = replace(
                space, init_from_sweep=parent if "://" in parent else str(Path(parent).expanduser().resolve())
            )
        if args.dry_run:
            print(dry_run(space, args.address, args.max_concurrent, args.asha))
            return
        storage = storage_location(args.storage)
        check_tracker(space.tracker, storage)  # before the lock and the data (run_sweep checks it for callers too)
        with driver_lock(storage, space.name):  # a second driver is refused before anything runs
            data_dir = str(default_data_dir(args.data_dir))  # absolute: trials run in their own working dirs
            for dataset in sorted({trial.dataset for trial in space.trials + space.continued}):
                load_dataset(dataset, data_dir, download=True)  # verified (or downloaded) before any trial starts
            start = time.perf_counter()
            path, rows, failed = run_sweep(
                space,
                storage,
                data_dir,
                args.resume,
                args.max_concurrent,
                args.asha,
                args.max_failures,
                args.wait_for_gpus,
                address=args.address,
                trust=args.trust_folder,
            )
    except IWAEError as error:
        exit_with(error)
    print_results(rows, path)
    print(f"Sweep wall time: {time.perf_counter() - start:.0f} s")
    print(f"TensorBoard: tensorboard --logdir {storage.rstrip('/')}/{space.name}")
    print(f"Query:       python -m sweep.query {storage.rstrip('/')}/{space.name}")
    if space.tracker:
        print(tracker_line(space.tracker, f"{storage.rstrip('/')}/{space.name}"))
    if failed:
        exit_with(
            f"{len(failed)} trial(s) failed for good and are not in the results: {', '.join(failed)} "
            f"(their error.txt says why; --resume retries them)"
        )


if __name__ == "__main__":
    main()
