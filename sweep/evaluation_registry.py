"""A sweep folder's evaluations as this driver knows them: those in its Parquet files, those
running as Ray tasks, and those collected but not yet written; and their TensorBoard events."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import ray
from pyarrow import fs as pafs
from ray import tune

from .evaluation_jobs import EvaluationJob, checkpoint_uri, same_evaluation
from .evaluation_task import result_of, submit
from .results import EVALUATION_SCALARS, PER_IMAGE_HISTOGRAMS, Evaluated, read_evaluated, write_evaluated
from .space import SweepSpace
from .tensorboard_files import events_written_to
from .trackers import log_evaluation
from .trials import trial_folder


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
        self.files_behind = False  # rows collected that the Parquet files do not hold yet

    def alike(self, trial_id: str, checkpoint: tune.Checkpoint, space: SweepSpace) -> bool:
        """Whether `checkpoint` is evaluated, or being evaluated, as `space` asks."""
        done = self.done.get(trial_id)
        return (done is not None and same_evaluation(done[0], checkpoint, space)) or any(
            (running_id, checkpoint_uri(running)) == (trial_id, checkpoint_uri(checkpoint))
            for running_id, running in self.running.values()
        )

    def start(self, job: EvaluationJob, cpus: float, gpus: float) -> ray.ObjectRef:
        ref = submit(job, cpus, gpus)
        self.running[ref] = (job.trial_id, job.checkpoint)
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
            self.files_behind = True
            rows.append(row)
            log_evaluation(row, checkpoint, self.folder, self.filesystem)  # to its trial's run, if tracked
        if write:
            self.write()
        if failure is not None:
            raise failure
        return rows

    def write(self) -> None:
        """The evaluations collected since the last write: their TensorBoard events, then the files
        rewritten whole. A write that fails (a full disk) raises; what it did not write is written
        by the next one, or by `evaluate_sweep` when training ends."""
        if self.unwritten or self.files_behind:
            self.write_events()
            write_evaluated(self.folder, self.filesystem, self.done)
            self.files_behind = False

    def write_events(self) -> None:
        """The TensorBoard events of the evaluations collected since the last write."""
        while self.unwritten:  # one at a time: after a failure, none is written twice
            row, per_image, checkpoint = self.unwritten[0]
            write_evaluation_events(row, per_image, checkpoint, self.folder)
            self.unwritten.pop(0)


class DriverEvaluations:
    """This driver's `Evaluations`, one per sweep folder: Ray's references belong to the process
    that made them, so a stage-2 callback and `evaluate_sweep` find those a callback started."""

    def __init__(self) -> None:
        self._by_folder: dict[str, Evaluations] = {}

    def of(self, folder: str, filesystem: pafs.FileSystem) -> Evaluations:
        """Sweep `folder`'s, made (its files read) on first use."""
        if folder not in self._by_folder:
            self._by_folder[folder] = Evaluations(folder, filesystem)
        return self._by_folder[folder]

    def known(self, folder: str) -> Evaluations | None:
        """Sweep `folder`'s if this driver has made them, without reading any file."""
        return self._by_folder.get(folder)

    def forget(self, folder: str) -> Evaluations | None:
        """Sweep `folder`'s, no longer kept here (a new run reads the files)."""
        return self._by_folder.pop(folder, None)


IN_THIS_DRIVER = DriverEvaluations()


def write_evaluation_events(
    row: dict[str, Any], per_image: dict[str, Any], checkpoint: tune.Checkpoint, folder: str
) -> None:
    """The evaluation's figures in the trial's TensorBoard: scalars (evaluation/test_nll, ess_mean,
    pareto_k_above_0_7, ais_minus_is, ...) and histograms of the per-image NLL, ESS, Pareto k̂
    and AIS NLL (results.EVALUATION_SCALARS, PER_IMAGE_HISTOGRAMS), at the checkpoint's pass, in
    the trial's folder (its run, replacing an earlier evaluation's), if the trial is in sweep
    `folder` (not another sweep's, --init-from-sweep). Written locally, then copied through the
    storage filesystem (`events_written_to`)."""
    if not checkpoint.path.startswith(f"{folder}/"):
        return
    with events_written_to(trial_folder(checkpoint), checkpoint.filesystem, "evaluation") as writer:
        for name in EVALUATION_SCALARS:
            if row[name] is not None and math.isfinite(row[name]):
                writer.add_scalar(f"evaluation/{name}", row[name], row["epochs"])
        for name in PER_IMAGE_HISTOGRAMS:
            values = per_image[name][np.isfinite(per_image[name])]
            if len(values):
                writer.add_histogram(f"evaluation/{name}_per_image", values, row["epochs"])
