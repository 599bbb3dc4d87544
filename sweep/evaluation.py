"""The sweep's k-sample evaluation of its best checkpoints, as Ray tasks.

With `best: each`, a trial's best checkpoint is evaluated once the trial has finished, on
resources no trial is waiting for, while the others train (`EvaluateAsTrialsFinish`); its
Parquet rows appear at once, so `sweep.query` shows it. When training ends, `evaluate_sweep`
evaluates what is left: every checkpoint of `best: top`, those no resources were free for, and
any that a killed driver did not finish. A
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
from iwae_model.files import WriteError

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
    record = EvaluationRecord(
        job["sweep"],
        job["trial_id"],
        trial_name(config, job["searched"], job["trial_id"]),
        job["uri"],
        uuid.uuid4().hex,
        config,
        state,
        nodes,
        {f"eval_{key}": value for key, value in this_node().items()},
        job["metric"],
        job["searched"],
    )
    return results_row(record, result), per_image_part(record, result)


# A GPU task's worker is not reused (Ray's default for a function declared with GPUs, which
# .options() does not give): a reused one would keep its first task's CUDA_VISIBLE_DEVICES, its
# CUDA context and the test set cached on the GPU, beside the trials that now share that GPU.
_ON_CPU = ray.remote(evaluate_checkpoint)
_ON_GPU = ray.remote(max_calls=1)(evaluate_checkpoint)


def evaluation_job(
    space: SweepSpace, data_dir: str, trial_id: str, checkpoint: tune.Checkpoint, threads: int
) -> dict[str, Any]:
    return {
        "sweep": space.name,
        "trial_id": trial_id,
        "checkpoint": checkpoint,
        "uri": checkpoint_uri(checkpoint),
        "k": space.evaluation.k,
        "images": space.evaluation.images,
        "data_dir": data_dir,
        "threads": threads,
        "metric": space.metric,
        "searched": sorted(space.search.distributions) if space.search else [],
    }


def submit(job: dict[str, Any], cpus: float, gpus: float) -> ray.ObjectRef:
    return (_ON_GPU if gpus else _ON_CPU).options(num_cpus=cpus, num_gpus=gpus).remote(job)


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
    return (row["checkpoint_uri"], row["eval_k"], row["eval_images"]) == (
        checkpoint_uri(checkpoint),
        space.evaluation.k,
        images,
    )


def headline(row: dict[str, Any]) -> str:
    return (
        f"{row['trial_name']} evaluated: test NLL {row['test_nll']:.2f} ± {row['test_nll_se']:.2f} "
        f"(k={row['eval_k']}, {row['eval_images']} images)"
    )


class Evaluations:
    """A sweep folder's evaluations as this driver knows them: those in its Parquet files and
    those running, which a later stage or `evaluate_sweep` collects rather than starts again."""

    def __init__(self, folder: str, filesystem: pafs.FileSystem, read: bool = True) -> None:
        self.folder, self.filesystem = folder, filesystem
        self.done: Evaluated = read_evaluated(folder, filesystem) if read else {}
        self.running: dict[ray.ObjectRef, tuple[str, tune.Checkpoint]] = {}  # ref: (trial id, checkpoint)
        self.unwritten: list[tuple[dict[str, Any], dict[str, Any], tune.Checkpoint]] = []  # collected since `write`

    def alike(self, trial_id: str, checkpoint: tune.Checkpoint, space: SweepSpace) -> bool:
        """Whether `checkpoint` is evaluated, or being evaluated, as `space` asks."""
        done = self.done.get(trial_id)
        return (done is not None and same_evaluation(done[0], checkpoint, space)) or any(
            (running_id, checkpoint_uri(running)) == (trial_id, checkpoint_uri(checkpoint))
            for running_id, running in self.running.values()
        )

    def start(self, job: dict[str, Any], cpus: float, gpus: float) -> ray.ObjectRef:
        ref = submit(job, cpus, gpus)
        self.running[ref] = (job["trial_id"], job["checkpoint"])
        return ref

    def collect(self, ready: list[ray.ObjectRef], write: bool = True) -> list[dict[str, Any]]:
        """The rows of the `ready` evaluations, kept here (with `write`: then written, see `write`);
        a failed one raises (without Ray's traceback for an IWAEError), the others still kept."""
        rows, failure = [], None
        for ref in ready:
            _, checkpoint = self.running.pop(ref)
            try:
                row, per_image = result_of(ref)
            except Exception as error:  # noqa: BLE001 -- raised once the others are kept
                failure = failure or error
                continue
            self.done[row["trial_id"]] = (row, per_image)
            self.unwritten.append((row, per_image, checkpoint))
            rows.append(row)
        if write:
            self.write()
        if failure is not None:
            raise failure
        return rows

    def write(self) -> None:
        """The evaluations collected since the last write: their TensorBoard events, then the files
        rewritten whole. A write that fails (a full disk) raises; what it did not write is written
        by the next one, or by `evaluate_sweep` when training ends."""
        if self.unwritten:
            self.write_events()
            write_evaluated(self.folder, self.filesystem, self.done)

    def write_events(self) -> None:
        """The TensorBoard events of the evaluations collected since the last write."""
        while self.unwritten:  # one at a time: after a failure, none is written twice
            row, per_image, checkpoint = self.unwritten[0]
            write_evaluation_events(row, per_image, checkpoint, self.folder)
            self.unwritten.pop(0)


_IN_THIS_DRIVER: dict[str, Evaluations] = {}  # by sweep folder: Ray's references are this process's


def evaluations(folder: str, filesystem: pafs.FileSystem) -> Evaluations:
    if folder not in _IN_THIS_DRIVER:
        _IN_THIS_DRIVER[folder] = Evaluations(folder, filesystem)
    return _IN_THIS_DRIVER[folder]


def forget(folder: str) -> Evaluations | None:
    """This driver's evaluations of sweep `folder`, no longer kept here (a new run reads the files)."""
    return _IN_THIS_DRIVER.pop(folder, None)


class EvaluateAsTrialsFinish(tune.Callback):
    """`best: each`: evaluates each trial's best checkpoint once the trial has finished, as a Ray
    task the size of a trial (its CPUs, or one CPU and `eval_gpus`), and writes its rows at once.

    Training comes first: an evaluation starts only while no trial waits for resources, and on
    resources free now (else it would hold a core a trial waits for). What has not started when
    training ends is left to `evaluate_sweep`, which also collects those still running. An error
    here is shown, never raised into Tune (it would fail the trial or the sweep): that
    checkpoint is evaluated again when training ends.

    Tune pickles its callbacks with the sweep, and a resumed sweep runs the restored copy: this
    one keeps only the sweep folder, and reads the space (resources as resumed) from its spec."""

    def __init__(self, folder: str, filesystem: pafs.FileSystem, view: LiveView) -> None:
        self.folder, self.filesystem, self.view = folder, filesystem, view
        self.waiting: list[dict[str, Any]] = []  # jobs of finished trials
        self.spec: tuple[SweepSpace, str] | None = None
        self.shown: set[str] = set()  # failures noted: one that repeats at every step is shown once

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "filesystem": self.filesystem, "view": self.view}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["filesystem"], state["view"])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        try:
            self.spec = self.spec or read_spec(self.folder, self.filesystem)
            space, data_dir = self.spec
            result = trial_result(trial)
            if result.checkpoint is None:
                return
            checkpoint = best_checkpoint(result, space.metric)
            if not evaluations(self.folder, self.filesystem).alike(trial.trial_id, checkpoint, space):
                self.waiting.append(
                    evaluation_job(space, data_dir, trial.trial_id, checkpoint, max(1, int(self.ask()[0])))
                )
        except Exception as error:  # noqa: BLE001 -- see the class's docstring
            self.failed(trials, f"{trial_label(trial)}'s evaluation", error)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        state = _IN_THIS_DRIVER.get(self.folder)  # made (its files read) when a trial finished
        if state is None or not (self.waiting or state.running):
            return
        try:
            self.spec = self.spec or read_spec(self.folder, self.filesystem)
            if self.waiting and not any(t.status == "PENDING" for t in trials):
                self.start()
            ready = ray.wait(list(state.running), num_returns=len(state.running), timeout=0)[0]
            if not ready:
                return
            # Collected before anything is written: a write that fails (a full disk) leaves them
            # kept here for `evaluate_sweep`, not ready again at every step.
            for row in state.collect(ready, write=False):
                self.view.note(trials, headline(row))
            # The trials file first: a query reading between the writes sees the trial unevaluated.
            merge_trials(
                [
                    trial_row(trial_result(t), self.spec[0], _STATUS.get(t.status))
                    for t in trials
                    if "epoch" in t.last_result
                ],  # (those that have reported a pass)
                self.folder,
                self.filesystem,
            )
            state.write()
        except WriteError as error:
            self.failed(trials, "writing the results", error)
        except Exception as error:  # noqa: BLE001 -- see the class's docstring
            self.failed(trials, "an evaluation", error)

    def ask(self) -> tuple[float, float]:
        """(CPUs, GPUs) of one evaluation while trials train."""
        resources = self.spec[0].resources
        return (1 if resources.eval_gpus else resources.cpus_per_trial), resources.eval_gpus

    def start(self) -> None:
        """The waiting evaluations that fit in the cluster's free resources."""
        cpus, gpus = self.ask()
        free = ray.available_resources()
        free_cpus, free_gpus = free.get("CPU", 0), free.get("GPU", 0)
        while self.waiting and free_cpus >= cpus and free_gpus >= gpus:
            evaluations(self.folder, self.filesystem).start(self.waiting.pop(0), cpus, gpus)
            free_cpus, free_gpus = free_cpus - cpus, free_gpus - gpus

    def failed(self, trials: list, what: str, error: Exception) -> None:
        """`what` failed, noted once however often it repeats (an IWAEError by its message alone)."""
        cause = (
            str(error).strip()
            if isinstance(error, IWAEError)
            else f"{type(error).__name__}: {str(error).strip()[:300]}"
        )
        text = f"{what} failed: {cause}; it is tried again when training ends"
        if text not in self.shown:
            self.shown.add(text)
            self.view.note(trials, text)


# A trial's status in trials.parquet while the sweep runs (a terminated one's says how it ended).
_STATUS = {"RUNNING": "running", "PENDING": "waiting", "PAUSED": "paused", "ERROR": "failed"}


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
    results path and rows. With `keep`, a checkpoint already evaluated alike (or being evaluated:
    EvaluateAsTrialsFinish) is kept and each new result is written as it arrives; without, every
    one is evaluated anew and the old files replaced when all are done."""
    gpus = space.resources.eval_gpus if eval_gpus is None else eval_gpus
    at_once = space.resources.eval_actors if eval_actors is None else eval_actors
    selected = select_checkpoints(grids, space)
    if not selected:
        raise NothingToEvaluate(f"{folder}: no finished trial with a checkpoint to evaluate")
    state = forget(folder)
    if not keep:
        state = Evaluations(folder, filesystem, read=False)
    elif state is None:
        state = Evaluations(folder, filesystem)
    chosen = dict(selected)
    state.done = {
        trial_id: done
        for trial_id, done in state.done.items()  # not those no longer selected
        if trial_id in chosen and same_evaluation(done[0], chosen[trial_id], space)
    }
    todo = [(trial_id, checkpoint) for trial_id, checkpoint in selected if not state.alike(trial_id, checkpoint, space)]
    images = space.evaluation.images or "all"
    if state.done:
        print(
            f"{len(state.done)} of {len(selected)} checkpoint(s) already evaluated with k={space.evaluation.k} on "
            f"{images} test images (as their trials finished, or before a resume): kept",
            file=sys.stderr,
        )
    if state.running:
        print(f"{len(state.running)} evaluation(s) started as their trials finished: still running", file=sys.stderr)
    at_once = min(at_once, max(1, len(todo)))
    # On CPU the evaluations share the cluster's cores (no more than one node has); on GPU one core
    # each feeds its GPU. Beside evaluations still running at a trial's size, the rest take that
    # size too, as many at a time as the cores hold: a wider one would leave cores idle until they end.
    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    node_cpus = max(node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"])
    cpus = 1 if gpus else int(max(1, min(node_cpus, cluster_cpus // at_once)))
    if state.running and not gpus:
        cpus = max(1, int(space.resources.cpus_per_trial))
        at_once = max(at_once, int(cluster_cpus // cpus))
    if todo:
        print(
            f"Evaluating {len(todo)} checkpoint(s) with k={space.evaluation.k} on {images} test images "
            f"({at_once} at a time, {gpus or 0} GPU and {cpus} CPU each)",
            file=sys.stderr,
        )
    waiting = [evaluation_job(space, data_dir, trial_id, checkpoint, cpus) for trial_id, checkpoint in todo]
    mine: set[ray.ObjectRef] = set()
    with tqdm(
        total=len(todo) + len(state.running), desc="k-sample evaluation", unit="checkpoint", file=sys.stderr
    ) as progress:
        while waiting or state.running:
            while waiting and len(mine & set(state.running)) < at_once:
                mine.add(state.start(waiting.pop(0), cpus, gpus))
            ready, _ = ray.wait(list(state.running), num_returns=1)
            state.collect(ready, write=keep)  # without keep, the old files stay whole until all are done
            progress.update(len(ready))
    state.write_events()  # without keep, all of them; with, those a full disk kept from being written
    rows = write_evaluated(folder, filesystem, state.done)
    write_trials(trial_rows(grids, space), f"{folder}/{TRIALS_FILE}", filesystem)
    write_hparams(folder, filesystem, grids, rows)
    return f"{folder}/{RESULTS_FILE}", rows


def write_evaluation_events(
    row: dict[str, Any], per_image: dict[str, Any], checkpoint: tune.Checkpoint, folder: str
) -> None:
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
        pafs.copy_files(
            local, destination, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=checkpoint.filesystem
        )
