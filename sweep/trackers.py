"""Experiment trackers (`sweep.run --tracker mlflow[=URI]` or `--tracker wandb`, `tracker:` in a
space file): a sweep's trials as runs in MLflow or Weights & Biases, through Ray Tune's own
`MLflowLoggerCallback` and `WandbLoggerCallback`.

One MLflow experiment (W&B project) per sweep, named as the sweep; one run per trial, named by
its label and found again by Ray's trial id; its settings as parameters, its per-pass metrics as
Ray Tune reports them (sweep.mlflow_callback, sweep.wandb_callback), and its k-sample evaluation
(test NLL, its SE, the ranking metric) and image grids logged to the same run once the evaluation
is collected (`log_evaluation`). The trials never talk to the tracker: MLflow is logged from the
driver, W&B from one process per trial on the driver's node. Without a URI MLflow's store is
embedded in the sweep folder (`mlflow/mlflow.db`, SQLite, and `mlflow/artifacts`); W&B keeps its
run files in the sweep folder's `wandb/` (all of it when WANDB_MODE=offline, for `wandb sync`).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from pyarrow import fs as pafs
from ray import tune

from iwae_model.errors import IWAEError

from .folder import read_spec
from .results import EVALUATION_SCALARS
from .space import SweepSpace
from .storage import is_local
from .tensorboard_files import EVENTS_PREFIX
from .trials import trial_config, trial_folder

EMBEDDED_DIR = "mlflow"  # in the sweep folder: the embedded store's database and artifacts
TRIAL_ID_TAG = "ray_trial_id"
FOLDER_TAG = "iwae_sweep.folder"
# The evaluation's figures on the trial's run, at the evaluated checkpoint's pass (results columns).
EVALUATION_METRICS = ("test_nll_se", "rank_metric_value", *EVALUATION_SCALARS)
IMAGE_TAGS = ("samples", "reconstructions")  # the trainable's TensorBoard image grids
NAMES = {"mlflow": "MLflow", "wandb": "W&B"}


class TrackerError(IWAEError, RuntimeError):
    pass


def tracker_kind(tracker: str) -> str:
    """ "mlflow" or "wandb", of a tracker setting ("mlflow", "mlflow=URI" or "wandb")."""
    return tracker.partition("=")[0]


def tracking_uri(tracker: str, folder: str) -> str:
    """The tracking URI of `tracker` ("mlflow" or "mlflow=URI") for sweep `folder` (a local path
    when the store is embedded)."""
    _, _, uri = tracker.partition("=")
    return uri or f"sqlite:///{Path(folder, EMBEDDED_DIR, 'mlflow.db')}"


def embedded(tracker: str) -> bool:
    """Whether MLflow `tracker` ("mlflow" or "mlflow=URI") keeps its store in the sweep folder."""
    return "=" not in tracker


def check_tracker(tracker: str | None, storage: str) -> None:
    """Refuse, before anything runs, a tracker that is not installed, an embedded MLflow store for a
    sweep on an object store (SQLite needs a local file), or W&B online without an account."""
    if not tracker:
        return
    kind = tracker_kind(tracker)
    try:
        __import__(kind)  # only whether it is installed
    except ImportError:
        raise TrackerError(
            f'--tracker {tracker}: {NAMES[kind]} is not installed; install the extra: pip install -e ".[{kind}]" '
            f"(or pip install {kind})"
        ) from None
    if kind == "mlflow" and embedded(tracker) and "://" in storage:
        raise TrackerError(
            f"--tracker mlflow: the sweep is stored at {storage}, and MLflow's embedded store (a SQLite file "
            f"in the sweep folder) must be a local file; pass --tracker mlflow=URI with a tracking server "
            f"(e.g. mlflow=http://mlflow.internal:5000), or store the sweep in a local or shared folder"
        )
    if kind == "wandb":
        check_wandb_login(f"--tracker {tracker}")


def check_wandb_login(where: str) -> None:
    """Refuse W&B online without an account here (wandb.init would ask for one at a prompt)."""
    import wandb

    if not wandb_offline() and not wandb.login(prompt=False, verify=False):
        raise TrackerError(
            f"{where}: no W&B account is set up here; run `wandb login` (or set WANDB_API_KEY), or set "
            f"WANDB_MODE=offline to keep the runs in files and upload them later with wandb sync"
        )


def wandb_offline() -> bool:
    """Whether W&B runs stay on this machine (WANDB_MODE, W&B's own switch: offline, dryrun or disabled)."""
    return os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled")


def wandb_dir(folder: str) -> str:
    """Where W&B keeps sweep `folder`'s run files (its wandb/ folder): the sweep folder when local,
    else the folder the command (sweep.run, sweep.evaluate) was started in (W&B writes local files)."""
    return folder if "://" not in folder else str(Path.cwd())


def tracker_line(tracker: str, folder: str) -> str:
    """The closing line of a tracked sweep: how to see its runs."""
    if tracker_kind(tracker) == "wandb":
        if os.environ.get("WANDB_MODE") == "disabled":
            return "W&B:         nothing logged (WANDB_MODE=disabled)"
        if wandb_offline():
            return f"W&B:         wandb sync {wandb_dir(folder)}/wandb/offline-run-*"
        return f"W&B:         project {folder.rstrip('/').rsplit('/', 1)[-1]} in your W&B account"
    uri = tracking_uri(tracker, folder)
    return f"MLflow:      mlflow ui --backend-store-uri {uri}" if embedded(tracker) else f"MLflow:      {uri}"


class NotedFailures:
    """A tracker's callback whose failure (a server down, a revoked key) is noted once and stops
    its logging, never raised: Ray Tune would end the sweep on a callback's exception, and the
    sweep's own files hold every figure."""

    where = "a tracker"  # named in the note

    def _guarded(self, what: str, call: Any, *args: Any, **kwargs: Any) -> None:
        if getattr(self, "_failed", None) is not None:
            return
        try:
            call(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 -- trackers raise many types; see the class's docstring
            self._failed = error
            print(
                f"note: {self.where}: {what} was not logged ({type(error).__name__}: {str(error).strip()[:300]}); "
                f"nothing more is logged to it in this run of the sweep, whose own files hold every figure "
                f"(a --resume logs again)",
                file=sys.stderr,
            )


def tracker_callbacks(space: SweepSpace, folder: str) -> list[tune.Callback]:
    """The Ray Tune callbacks that log sweep `folder`'s trials to `space.tracker` (none without)."""
    if not space.tracker:
        return []
    # Imported here: Ray's modules import MLflow or W&B, seconds of start-up for every command.
    if tracker_kind(space.tracker) == "wandb":
        from .wandb_callback import SweepWandbCallback

        return [SweepWandbCallback(space, folder)]
    from .mlflow_callback import SweepMLflowCallback

    return [SweepMLflowCallback(space, folder)]


def run_params(space: SweepSpace, config: dict[str, Any]) -> dict[str, str]:
    """A trial's tracker parameters: its whole training configuration (what it varies in and the
    protocol's settings, drawn values included) and the sweep's evaluation protocol."""
    train = trial_config(config).to_dict()
    evaluation = space.evaluation
    return {
        **{key: str(value) for key, value in train.items()},
        "sweep": space.name,
        "rank_metric": space.metric,
        "eval_k": str(evaluation.k),
        "eval_images": str(evaluation.images or "all"),
        "eval_best": evaluation.best,
    }


def find_run(client: Any, experiment_id: str, trial_id: str, folder: str) -> Any | None:
    """The run of Ray trial `trial_id` of sweep `folder`, if one was started (a resumed driver's)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.{TRIAL_ID_TAG} = '{trial_id}'")
    # The folder is compared here, not in the filter: a path may hold quotes.
    return next((run for run in runs if run.data.tags.get(FOLDER_TAG) == folder), None)


def log_evaluation(row: dict[str, Any], checkpoint: tune.Checkpoint, folder: str, filesystem: pafs.FileSystem) -> None:
    """Log an evaluation `row` (results.parquet's) to its trial's run, if sweep `folder` has a tracker:
    its figures as metrics at the checkpoint's pass, what it evaluated as tags, the trial's image
    grids as artifacts (in W&B: the run's summary and files). A tracker that fails is noted, never
    raised: the results files hold the row."""
    tracker = "a tracker"
    try:
        space, _ = read_spec(folder, filesystem)
        if not space.tracker:
            return
        kind = tracker_kind(space.tracker)
        tracker = NAMES[kind]
        if kind == "wandb":
            from .wandb_callback import log_wandb_evaluation

            log_wandb_evaluation(space, folder, row, checkpoint)
        else:
            log_mlflow_evaluation(space, folder, row, checkpoint)
    except Exception as error:  # noqa: BLE001 -- trackers raise many types; the results are safe anyway
        print(
            f"note: {tracker}: {row['trial_name']}'s evaluation was not logged to its run "
            f"({type(error).__name__}: {str(error).strip()[:300]}); it is in the results files",
            file=sys.stderr,
        )


def evaluation_figures(row: dict[str, Any]) -> dict[str, float]:
    """An evaluation row's figures for its trial's run (those it has)."""
    return {
        name: float(row[name]) for name in EVALUATION_METRICS if row.get(name) is not None and math.isfinite(row[name])
    }


def evaluation_tags(row: dict[str, Any]) -> dict[str, Any]:
    """What an evaluation row evaluated, as the run's tags."""
    return {
        f"evaluation.{tag}": row[tag]
        for tag in ("rank_metric", "eval_k", "eval_images", "checkpoint_uri", "evaluation_id")
    }


def log_mlflow_evaluation(space: SweepSpace, folder: str, row: dict[str, Any], checkpoint: tune.Checkpoint) -> None:
    """An evaluation `row` on its trial's MLflow run: figures at the checkpoint's pass, tags, image grids."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(space.tracker, folder))
    experiment = client.get_experiment_by_name(space.name)
    run = experiment and find_run(client, experiment.experiment_id, row["trial_id"], folder)
    if run is None:  # another sweep's trial (--init-from-sweep), or one this sweep never tracked
        return
    step, now = row["epochs"], int(row["timestamp"].timestamp() * 1000)
    figures = evaluation_figures(row)
    client.log_batch(run.info.run_id, metrics=[Metric(name, value, now, step) for name, value in figures.items()])
    for tag, value in evaluation_tags(row).items():
        client.set_tag(run.info.run_id, tag, str(value))
    with tempfile.TemporaryDirectory() as images:
        if write_image_grids(checkpoint, Path(images)):
            client.log_artifacts(run.info.run_id, images, "images")


def write_image_grids(checkpoint: tune.Checkpoint, images: Path) -> int:
    """Write the trial's sample and reconstruction grids (from the TensorBoard files of its run, the
    folder of its checkpoints) into folder `images` as `<tag>_pass<N>.png`; how many."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    trial_dir = trial_folder(checkpoint)
    filesystem = checkpoint.filesystem
    with tempfile.TemporaryDirectory() as local:
        events = trial_dir
        if not is_local(filesystem):  # TensorBoard's reader takes local files: the event files only
            events = local
            for info in filesystem.get_file_info(pafs.FileSelector(trial_dir)):
                if info.base_name.startswith(EVENTS_PREFIX):
                    pafs.copy_files(
                        info.path,
                        f"{events}/{info.base_name}",
                        source_filesystem=filesystem,
                        destination_filesystem=pafs.LocalFileSystem(),
                    )
        accumulator = EventAccumulator(events, size_guidance={IMAGES: 0})  # 0: every image, not a sample
        accumulator.Reload()
        images.mkdir(parents=True, exist_ok=True)
        written = 0
        for tag in set(IMAGE_TAGS) & set(accumulator.Tags()[IMAGES]):
            for event in accumulator.Images(tag):
                (images / f"{tag}_pass{event.step:05d}.png").write_bytes(event.encoded_image_string)
                written += 1
        return written
