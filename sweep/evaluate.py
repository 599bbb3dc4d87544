"""The sweep's final stage: Ray actors run the k=5000 evaluation on the best checkpoints and
the driver writes the Parquet results.

    python -m sweep.evaluate SWEEP_DIR [--k 5000] [--images N] [--eval-gpus G] [--eval-actors A]

re-runs this stage alone on a finished sweep (e.g. with another k); the new Parquet replaces
the old one atomically.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import uuid
from dataclasses import replace
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
from iwae_model.datasets import load_dataset
from iwae_model.checkpoint import CHECKPOINT_NAME, CheckpointError, load_model
from iwae_model.device import pin_float32
from iwae_model.errors import IWAEError
from iwae_model.evaluation import evaluate_model

from .cluster import check_gpus, init_ray, ray_device, this_node
from .folder import SweepFolderError, checkpoint_uri, load_grids, read_spec, select_checkpoints, trial_name, trial_rows
from .hparams import write_hparams
from .results import (
    PER_IMAGE_FILE,
    RESULTS_FILE,
    TRIALS_FILE,
    EvaluationRecord,
    per_image_part,
    per_image_table,
    results_row,
    write_results,
    write_table,
    write_trials,
)
from .space import SweepSpace
from .storage import filesystem_and_path
from .tables import print_results
from .trainable import NODES_FILE, read_nodes


class NothingToEvaluate(IWAEError, RuntimeError):
    pass


@ray.remote
class Evaluator:
    """Loads checkpoints and runs iwae_model's evaluation on the device Ray gave it."""

    def __init__(self, data_dir: str, threads: int):
        torch.set_num_threads(threads)
        pin_float32()
        self.data_dir = data_dir
        self.node = {f"eval_{key}": value for key, value in this_node().items()}  # an actor stays on its node
        self.device: torch.device | None = None  # chosen by the first job, whose error Ray reports without a traceback
        self.data: dict[tuple[str, str], Dataset] = {}  # by (dataset, binarization)

    def evaluate(self, job: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(results row, per-image columns) of one checkpoint."""
        self.device = self.device or ray_device()
        with job["checkpoint"].as_directory() as folder:  # on object storage: downloaded to /tmp
            try:
                model, config, state = load_model(Path(folder) / CHECKPOINT_NAME, self.device)
                nodes = read_nodes(Path(folder) / NODES_FILE)
            except CheckpointError as error:  # name the file where the user finds it, not the /tmp copy
                raise CheckpointError(str(error).replace(folder, job["uri"])) from None
        key = (config.dataset, config.binarization)
        if key not in self.data:
            self.data[key] = load_dataset(config.dataset, self.data_dir, self.device, config.binarization)
        data = self.data[key]
        result = evaluate_model(model, data, config.build_objective(), job["k"], job["images"])
        record = EvaluationRecord(job["sweep"], job["trial_id"], trial_name(config, job["searched"], job["trial_id"]),
                                  job["uri"], job["evaluation_id"], config, state, nodes, self.node, job["metric"],
                                  job["searched"])
        return results_row(record, result), per_image_part(record, result)


def run_evaluation(
    grids: list[tune.ResultGrid],
    folder: str,
    filesystem: pafs.FileSystem,
    space: SweepSpace,
    data_dir: str,
    eval_gpus: float | None = None,
    eval_actors: int | None = None,
) -> tuple[str, list[dict]]:
    """Evaluate the selected checkpoints of every stage's grid on `eval_actors` actors; write the
    Parquet files into the sweep `folder` (on `filesystem`); return the results path and rows."""
    gpus = space.resources.eval_gpus if eval_gpus is None else eval_gpus
    actors = space.resources.eval_actors if eval_actors is None else eval_actors
    selected = select_checkpoints(grids, space)
    if not selected:
        raise NothingToEvaluate(f"{folder}: no finished trial with a checkpoint to evaluate")
    actors = min(actors, len(selected))
    # On CPU the actors share the cluster's cores (no more than one node has); on GPU one core
    # each feeds its GPU.
    node_cpus = max(node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"])
    cpus = 1 if gpus else int(max(1, min(node_cpus, ray.cluster_resources().get("CPU", 1) // actors)))
    pool = ray.util.ActorPool([Evaluator.options(num_cpus=cpus, num_gpus=gpus).remote(data_dir, cpus)
                               for _ in range(actors)])
    evaluation_id = uuid.uuid4().hex
    jobs = [{"sweep": space.name, "trial_id": trial_id, "checkpoint": checkpoint, "uri": checkpoint_uri(checkpoint),
             "k": space.evaluation.k, "images": space.evaluation.images, "evaluation_id": evaluation_id,
             "metric": space.metric, "searched": sorted(space.search.distributions) if space.search else []}
            for trial_id, checkpoint in selected]
    images = space.evaluation.images or "all"
    print(f"Evaluating {len(jobs)} checkpoint(s) with k={space.evaluation.k} on {images} test images "
          f"({actors} actor(s), {gpus or 0} GPU and {cpus} CPU each)", file=sys.stderr)
    try:
        evaluated = list(tqdm(pool.map_unordered(lambda actor, job: actor.evaluate.remote(job), jobs),
                              total=len(jobs), desc="k-sample evaluation", unit="checkpoint", file=sys.stderr))
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, IWAEError):  # without Ray's traceback around it
            raise error.cause from None
        raise
    evaluated.sort(key=lambda pair: pair[0]["trial_name"])
    rows = [row for row, _ in evaluated]
    # The per-image and trials files first: results.parquet names the evaluation_id its per-image rows carry,
    # so a crash between the two writes is detected by sweep.query rather than mixing evaluations.
    write_table(per_image_table([per_image for _, per_image in evaluated]), f"{folder}/{PER_IMAGE_FILE}", filesystem)
    write_trials(trial_rows(grids, space), f"{folder}/{TRIALS_FILE}", filesystem)
    path = f"{folder}/{RESULTS_FILE}"
    write_results(rows, path, filesystem)
    write_hparams(folder, filesystem, grids, rows)
    checkpoints = dict(selected)
    for row, per_image in evaluated:
        if checkpoints[row["trial_id"]].path.startswith(f"{folder}/"):  # not into another sweep (--init-from-sweep)
            write_evaluation_events(row, per_image, checkpoints[row["trial_id"]])
    return path, rows


def write_evaluation_events(row: dict[str, Any], per_image: dict[str, Any], checkpoint: tune.Checkpoint) -> None:
    """The evaluation's figures in the trial's TensorBoard: scalars (evaluation/test_nll, ess_mean,
    pareto_k_above_0_7, ...) and histograms of the per-image NLL, ESS and Pareto k̂, at the
    checkpoint's pass, in `tb_evaluation/<evaluation id>` beside the trial's checkpoints. Written
    locally, then copied through the storage filesystem (TensorBoard cannot write to S3)."""
    trial_dir = checkpoint.path.rstrip("/").rsplit("/", 1)[0]
    with tempfile.TemporaryDirectory() as folder:
        with SummaryWriter(folder) as writer:
            for name in ("test_nll", "test_bound", "ess_mean", "ess_median", "pareto_k_above_0_7", "pareto_k_max"):
                if row[name] is not None and math.isfinite(row[name]):
                    writer.add_scalar(f"evaluation/{name}", row[name], row["epochs"])
            for name in ("nll", "ess", "pareto_k"):
                values = per_image[name][np.isfinite(per_image[name])]
                if len(values):
                    writer.add_histogram(f"evaluation/{name}_per_image", values, row["epochs"])
        destination = f"{trial_dir}/tb_evaluation/{row['evaluation_id']}"
        checkpoint.filesystem.create_dir(destination, recursive=True)
        pafs.copy_files(folder, destination, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=checkpoint.filesystem)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sweep.evaluate",
        description="Re-run a finished sweep's evaluation stage: the k-sample test log-likelihood of its best "
                    "checkpoints, written to SWEEP_DIR/" + RESULTS_FILE + " (replacing the old file).")
    parser.add_argument("sweep_dir", help="the sweep folder (<storage>/<name>), a local path or s3://... URI")
    parser.add_argument("--k", type=int, default=None, help="importance samples (default: the space file's, 5000)")
    parser.add_argument("--images", type=int, default=None,
                        help="first N test images (default: the space file's, null: the whole test set)")
    parser.add_argument("--eval-gpus", type=float, default=None, help="GPUs per evaluation actor (default: the space file's)")
    parser.add_argument("--eval-actors", type=int, default=None, help="actors sharing the work (default: the space file's)")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: start a local Ray)")
    args = parser.parse_args(argv)
    for name in ("k", "images", "eval_actors"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    try:
        grids = load_grids(args.sweep_dir)
        filesystem, folder = filesystem_and_path(args.sweep_dir)
        space, data_dir = read_spec(folder, filesystem)
    except SweepFolderError as error:
        parser.exit(1, f"error: {error}\n")
    evaluation = replace(space.evaluation, k=args.k or space.evaluation.k,
                         images=args.images if args.images is not None else space.evaluation.images)
    space = replace(space, evaluation=evaluation)
    start = time.perf_counter()
    try:
        init_ray(args.address)
        check_gpus(0, args.eval_gpus if args.eval_gpus is not None else space.resources.eval_gpus)
        path, rows = run_evaluation(grids, folder, filesystem, space, data_dir, args.eval_gpus, args.eval_actors)
    except IWAEError as error:
        parser.exit(1, f"error: {error}\n")
    print_results(rows, path)
    print(f"Evaluation wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
