"""The sweep's k-sample evaluation of its best checkpoints, as Ray tasks.

With `best: each`, a trial's best checkpoint is evaluated as soon as the trial finishes, on the
resources it leaves free, while the others train (`EvaluateAsTrialsFinish`); its Parquet rows
appear at once, so `sweep.query` shows it. When training ends, `evaluate_sweep` evaluates what
is left: every checkpoint of `best: top`, and any that a killed driver did not finish. A
checkpoint already in the results with the same k and images is kept, so a resumed sweep evaluates
nothing twice. The files are rewritten whole as each result arrives: a crash loses at most the
evaluations in progress.
"""

from __future__ import annotations

import functools
import math
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from pyarrow import fs as pafs
from ray import tune
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from iwae_model import Dataset
from iwae_model.checkpoint import CHECKPOINT_NAME, CheckpointError, load_model
from iwae_model.datasets import SPLIT_SIZES, load_dataset
from iwae_model.device import pin_float32
from iwae_model.errors import IWAEError
from iwae_model.evaluation import evaluate_model

from .cluster import ray_device, this_node
from .folder import (
    best_checkpoint,
    checkpoint_uri,
    read_spec,
    select_checkpoints,
    trial_label,
    trial_name,
    trial_result,
    trial_row,
    trial_rows,
)
from .hparams import write_hparams
from .live import LiveView
from .results import (
    RESULTS_FILE,
    TRIALS_FILE,
    Evaluated,
    EvaluationRecord,
    merge_trials,
    per_image_part,
    read_evaluated,
    results_row,
    write_evaluated,
    write_trials,
)
from .space import SweepSpace
from .trainable import NODES_FILE, read_nodes


class NothingToEvaluate(IWAEError, RuntimeError):
    pass


@functools.lru_cache(maxsize=2)
def _dataset(name: str, data_dir: str, device: str, binarization: str) -> Dataset:
    return load_dataset(name, data_dir, torch.device(device), binarization)  # kept for the worker's next task


@ray.remote
def evaluate_checkpoint(job: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(results row, per-image columns) of one checkpoint, on the device Ray gave this task."""
    torch.set_num_threads(job["threads"])
    pin_float32()
    device = ray_device()
    with job["checkpoint"].as_directory() as folder:  # on object storage: downloaded to /tmp
        try:
            model, config, state = load_model(Path(folder) / CHECKPOINT_NAME, device)
            nodes = read_nodes(Path(folder) / NODES_FILE)
        except CheckpointError as error:  # name the file where the user finds it, not the /tmp copy
            raise CheckpointError(str(error).replace(folder, job["uri"])) from None
    data = _dataset(config.dataset, job["data_dir"], str(device), config.binarization)
    result = evaluate_model(model, data, config.build_objective(), job["k"], job["images"])
    record = EvaluationRecord(job["sweep"], job["trial_id"], trial_name(config, job["searched"], job["trial_id"]),
                              job["uri"], uuid.uuid4().hex, config, state, nodes,
                              {f"eval_{key}": value for key, value in this_node().items()}, job["metric"],
                              job["searched"])
    return results_row(record, result), per_image_part(record, result)


def evaluation_job(space: SweepSpace, data_dir: str, trial_id: str, checkpoint: tune.Checkpoint,
                   threads: int) -> dict[str, Any]:
    return {"sweep": space.name, "trial_id": trial_id, "checkpoint": checkpoint, "uri": checkpoint_uri(checkpoint),
            "k": space.evaluation.k, "images": space.evaluation.images, "data_dir": data_dir, "threads": threads,
            "metric": space.metric, "searched": sorted(space.search.distributions) if space.search else []}


def submit(job: dict[str, Any], cpus: float, gpus: float) -> ray.ObjectRef:
    return evaluate_checkpoint.options(num_cpus=cpus, num_gpus=gpus).remote(job)


def result_of(ref: ray.ObjectRef) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, IWAEError):  # without Ray's traceback around it
            raise error.cause from None
        raise


def same_evaluation(row: dict[str, Any], checkpoint: tune.Checkpoint, space: SweepSpace) -> bool:
    """Whether results `row` is `checkpoint` evaluated as `space` asks (k, test images)."""
    test_images = SPLIT_SIZES.get(row["dataset"], (0, 0, 0))[2]
    images = min(space.evaluation.images or test_images, test_images)
    return (row["checkpoint_uri"], row["eval_k"], row["eval_images"]) == (checkpoint_uri(checkpoint),
                                                                         space.evaluation.k, images)


def headline(row: dict[str, Any]) -> str:
    return (f"{row['trial_name']} evaluated: test NLL {row['test_nll']:.2f} ± {row['test_nll_se']:.2f} "
            f"(k={row['eval_k']}, {row['eval_images']} images)")


class EvaluateAsTrialsFinish(tune.Callback):
    """`best: each`: evaluates each trial's best checkpoint as the trial finishes, as a Ray task
    the size of a trial (its CPUs, or one CPU and `eval_gpus`), and writes its rows at once.

    Tune pickles its callbacks with the sweep, and a resumed sweep runs the restored copy: this
    one keeps only the sweep folder, and reads the space (resources as resumed) from its spec."""

    def __init__(self, folder: str, filesystem: pafs.FileSystem, view: LiveView) -> None:
        self.folder, self.filesystem, self.view = folder, filesystem, view
        self.pending: dict[ray.ObjectRef, tuple[str, tune.Checkpoint]] = {}
        self.spec: tuple[SweepSpace, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "filesystem": self.filesystem, "view": self.view}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["filesystem"], state["view"])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.spec = self.spec or read_spec(self.folder, self.filesystem)
        space, data_dir = self.spec
        result = trial_result(trial)
        if result.checkpoint is None:
            return
        gpus = space.resources.eval_gpus
        cpus = 1 if gpus else space.resources.cpus_per_trial
        checkpoint = best_checkpoint(result, space.metric)
        done = read_evaluated(self.folder, self.filesystem).get(trial.trial_id)
        if done and same_evaluation(done[0], checkpoint, space):  # a resumed sweep's trial that had finished
            return
        job = evaluation_job(space, data_dir, trial.trial_id, checkpoint, max(1, int(cpus)))
        self.pending[submit(job, cpus, gpus)] = (trial_label(trial), checkpoint)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.pending:
            self.collect(trials, ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)[0])

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.pending:
            self.view.note(trials, f"waiting for {len(self.pending)} evaluation(s) of finished trials")
        while self.pending:
            self.collect(trials, ray.wait(list(self.pending), num_returns=1)[0])

    def collect(self, trials: list, ready: list[ray.ObjectRef]) -> None:
        space, _ = self.spec
        for ref in ready:
            label, checkpoint = self.pending.pop(ref)
            try:
                row, per_image = result_of(ref)
            except Exception as error:  # noqa: BLE001 -- the sweep trains on; evaluate_sweep retries and raises
                self.view.note(trials, f"{label}: its evaluation failed ({type(error).__name__}: "
                                       f"{str(error).strip()[:300]}); it is tried again when training ends")
                continue
            # The trials file first: a query reading between the two writes sees the trial unevaluated.
            merge_trials([trial_row(trial_result(t), space, _STATUS.get(t.status)) for t in trials
                          if "epoch" in t.last_result],  # (those that have reported a pass)
                         self.folder, self.filesystem)
            evaluated = read_evaluated(self.folder, self.filesystem)
            evaluated[row["trial_id"]] = (row, per_image)
            write_evaluated(self.folder, self.filesystem, evaluated)
            write_evaluation_events(row, per_image, checkpoint, self.folder)
            self.view.note(trials, headline(row))


# A trial's status in trials.parquet while the sweep runs (a terminated one's says how it ended).
_STATUS = {"RUNNING": "running", "PENDING": "running", "PAUSED": "paused", "ERROR": "failed"}


def evaluate_sweep(
    grids: list[tune.ResultGrid],
    folder: str,
    filesystem: pafs.FileSystem,
    space: SweepSpace,
    data_dir: str,
    eval_gpus: float | None = None,
    eval_actors: int | None = None,
    keep: bool = True,
) -> tuple[str, list[dict]]:
    """Evaluate the selected checkpoints of every stage's grid, `eval_actors` at a time; write the
    Parquet files and TensorBoard's HParams into the sweep `folder` (on `filesystem`); return the
    results path and rows. With `keep`, a checkpoint already evaluated alike is kept and each new
    result is written as it arrives; without, every one is evaluated anew and the old files
    replaced when all are done."""
    gpus = space.resources.eval_gpus if eval_gpus is None else eval_gpus
    actors = space.resources.eval_actors if eval_actors is None else eval_actors
    selected = select_checkpoints(grids, space)
    if not selected:
        raise NothingToEvaluate(f"{folder}: no finished trial with a checkpoint to evaluate")
    earlier = read_evaluated(folder, filesystem) if keep else {}
    evaluated: Evaluated = {trial_id: earlier[trial_id] for trial_id, checkpoint in selected
                            if trial_id in earlier and same_evaluation(earlier[trial_id][0], checkpoint, space)}
    todo = [(trial_id, checkpoint) for trial_id, checkpoint in selected if trial_id not in evaluated]
    images = space.evaluation.images or "all"
    if evaluated:
        print(f"{len(evaluated)} of {len(selected)} checkpoint(s) already evaluated with k={space.evaluation.k} on "
              f"{images} test images: kept", file=sys.stderr)
    if todo:
        actors = min(actors, len(todo))
        # On CPU the evaluations share the cluster's cores (no more than one node has); on GPU one
        # core each feeds its GPU.
        node_cpus = max(node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"])
        cpus = 1 if gpus else int(max(1, min(node_cpus, ray.cluster_resources().get("CPU", 1) // actors)))
        print(f"Evaluating {len(todo)} checkpoint(s) with k={space.evaluation.k} on {images} test images "
              f"({actors} at a time, {gpus or 0} GPU and {cpus} CPU each)", file=sys.stderr)
        jobs = [evaluation_job(space, data_dir, trial_id, checkpoint, cpus) for trial_id, checkpoint in todo]
        checkpoints = dict(todo)
        for row, per_image in tqdm(run_jobs(jobs, cpus, gpus, actors), total=len(jobs), desc="k-sample evaluation",
                                   unit="checkpoint", file=sys.stderr):
            evaluated[row["trial_id"]] = (row, per_image)
            if keep:  # else the old results stay whole until the new ones replace them
                write_evaluated(folder, filesystem, evaluated)
            write_evaluation_events(row, per_image, checkpoints[row["trial_id"]], folder)
    rows = write_evaluated(folder, filesystem, evaluated)  # without the rows of checkpoints no longer selected
    write_trials(trial_rows(grids, space), f"{folder}/{TRIALS_FILE}", filesystem)
    write_hparams(folder, filesystem, grids, rows)
    return f"{folder}/{RESULTS_FILE}", rows


def run_jobs(jobs: list[dict[str, Any]], cpus: float, gpus: float, at_once: int) -> Iterator[tuple[dict, dict]]:
    """Each job's (row, per-image columns) as it finishes, `at_once` running at a time."""
    waiting, running = list(jobs), []
    while waiting or running:
        while waiting and len(running) < at_once:
            running.append(submit(waiting.pop(0), cpus, gpus))
        [done], running = ray.wait(running, num_returns=1)
        yield result_of(done)


def write_evaluation_events(row: dict[str, Any], per_image: dict[str, Any], checkpoint: tune.Checkpoint,
                            folder: str) -> None:
    """The evaluation's figures in the trial's TensorBoard: scalars (evaluation/test_nll, ess_mean,
    pareto_k_above_0_7, ...) and histograms of the per-image NLL, ESS and Pareto k̂, at the
    checkpoint's pass, in `tb_evaluation/<evaluation id>` beside the trial's checkpoints, if the
    trial is in sweep `folder` (not another sweep's, --init-from-sweep). Written locally, then
    copied through the storage filesystem (TensorBoard cannot write to S3)."""
    if not checkpoint.path.startswith(f"{folder}/"):
        return
    trial_dir = checkpoint.path.rstrip("/").rsplit("/", 1)[0]
    with tempfile.TemporaryDirectory() as local:
        with SummaryWriter(local) as writer:
            for name in ("test_nll", "test_bound", "ess_mean", "ess_median", "pareto_k_above_0_7", "pareto_k_max"):
                if row[name] is not None and math.isfinite(row[name]):
                    writer.add_scalar(f"evaluation/{name}", row[name], row["epochs"])
            for name in ("nll", "ess", "pareto_k"):
                values = per_image[name][np.isfinite(per_image[name])]
                if len(values):
                    writer.add_histogram(f"evaluation/{name}_per_image", values, row["epochs"])
        destination = f"{trial_dir}/tb_evaluation/{row['evaluation_id']}"
        checkpoint.filesystem.create_dir(destination, recursive=True)
        pafs.copy_files(local, destination, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=checkpoint.filesystem)
