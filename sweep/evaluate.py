"""The sweep's final stage: Ray actors run the k=5000 evaluation on the best checkpoints and
the driver writes the Parquet results.

    python -m sweep.evaluate SWEEP_DIR [--k 5000] [--images N] [--eval-gpus G] [--eval-actors A]

re-runs this stage alone on a finished sweep (e.g. with another k); the new Parquet replaces
the old one atomically.
"""

from __future__ import annotations

import argparse
import datetime
import json
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

import iwae_model
from iwae_model import MNIST, load_mnist
from iwae_model.checkpoint import CHECKPOINT_NAME, CheckpointError, load_model
from iwae_model.data import MNISTError
from iwae_model.device import pin_float32
from iwae_model.evaluate import evaluate_model

from .cluster import ClusterError, GPUUnusable, check_gpus, init_ray, ray_device, this_node
from .query import print_results
from .results import PER_IMAGE_FILE, RESULTS_FILE, filesystem_and_path, per_image_table, write_results, write_table
from .space import Evaluation, SweepSpace
from .trainable import NODES_FILE, read_nodes, train_trial

SPEC_FILE = "iwae_sweep.json"  # the sweep's space and data dir, written by sweep.run
STAGE_2 = "stage2"  # a `continue` stage's Tune experiment, inside the sweep folder
METRIC = "valid_bound"  # checkpoints and trials are ranked by the validation bound, never by test figures


def checkpoint_uri(checkpoint: tune.Checkpoint) -> str:
    scheme = checkpoint.filesystem.type_name
    return checkpoint.path if scheme == "local" else f"{scheme}://{checkpoint.path}"


def stage_storage(storage: str, name: str) -> str:
    """The storage location (path or URI, its query kept) of the experiments inside sweep `name`."""
    path, sep, query = storage.partition("?")
    return f"{path.rstrip('/')}/{name}{sep}{query}"


def best_checkpoint(result: tune.Result) -> tune.Checkpoint:
    return result.get_best_checkpoint(METRIC, "max") or result.checkpoint


class NothingToEvaluate(RuntimeError):
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
        self.data: dict[str, MNIST] = {}

    def evaluate(self, job: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(results row, per-image columns) of one checkpoint."""
        self.device = self.device or ray_device()
        with job["checkpoint"].as_directory() as folder:  # on object storage: downloaded to /tmp
            try:
                model, config, state = load_model(Path(folder) / CHECKPOINT_NAME, self.device)
                nodes = read_nodes(Path(folder) / NODES_FILE)
            except (CheckpointError, ValueError) as error:  # name the file where the user finds it, not the /tmp copy
                raise CheckpointError(str(error).replace(folder, job["uri"])) from None
        if config.binarization not in self.data:
            self.data[config.binarization] = load_mnist(self.data_dir, self.device, config.binarization)
        data = self.data[config.binarization]
        result = evaluate_model(model, data, config.build_objective(), job["k"], job["images"])
        last = state["history"][-1]
        snr_row = next((row for row in reversed(state["history"]) if row.get("snr")), None)
        snr = snr_row["snr"] if snr_row else {}
        row = {
            "sweep": job["sweep"], "trial_id": job["trial_id"], "trial_name": config.label(),
            "objective": config.objective, "m": config.m, "k": config.k, "beta": config.beta,
            "layers": config.layers, "estimator": config.estimator, "seed": config.seed, "passes": config.passes,
            "schedule": config.schedule, "binarization": config.binarization, "train_images": config.train_images,
            "eval_k": result.k, "eval_images": result.images,
            "comparable_to_papers": result.comparable_to_papers and config.comparable_to_papers,
            "test_nll": result.nll, "test_nll_se": result.nll_se,
            "test_bound": result.test_bound, "test_bound_name": result.test_bound_name,
            "train_bound": last["train_bound"], "valid_bound": last["valid_bound"],
            "active_units": result.active_units, "epochs": state["epoch"], "train_seconds": state["train_seconds"],
            "eval_seconds": result.seconds, "device": result.device, "eval_float32": result.float32,
            "eval_gpu_name": result.gpu_name, "eval_gpu_capability": result.gpu_capability,
            "checkpoint_uri": job["uri"],
            "project_version": iwae_model.__version__,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0),
            "config": json.dumps(config.to_dict()),
            "ess_mean": result.ess_mean, "ess_median": result.ess_median,
            "pareto_k_above_0_7": result.pareto_k_above, "pareto_k_max": result.pareto_k_max,
            "noise": result.noise, "evaluation_id": job["evaluation_id"],
            "snr_epoch": snr_row["epoch"] if snr_row else None,
            **{f"snr_{name}": snr.get(name) for name in ("encoder_mean", "encoder_median", "decoder_mean", "decoder_median")},
            "snr": json.dumps(snr) if snr else None,
            "sweep_stage": 2 if config.init_from else 1, "parent_trial_name": config.init_label,
            "parent_checkpoint_uri": config.init_from,
            **{f"train_{key}": nodes[-1].get(key) if nodes else None
               for key in ("device", "node_id", "node_ip", "hostname", "float32", "gpu_name", "gpu_capability")},
            "train_nodes": json.dumps(nodes) if nodes else None,
            "generator_reseeded_at": next((row["epoch"] for row in state["history"] if row.get("generator_reseeded")),
                                          None),
            **self.node,
        }
        per_image = {"evaluation_id": job["evaluation_id"], "trial_id": job["trial_id"], "trial_name": row["trial_name"],
                     "checkpoint_uri": job["uri"], "image": result.per_image["image"],
                     "nll": -result.per_image["log_likelihood"], "ess": result.per_image["ess"],
                     "pareto_k": result.per_image["pareto_k"]}
        return row, per_image


def select_checkpoints(grids: list[tune.ResultGrid], evaluation: Evaluation) -> list[tuple[str, tune.Checkpoint]]:
    """(trial id, checkpoint) pairs: the best checkpoint of every finished trial by validation
    bound (`best: each`), or of the `top` trials with the best validation bound (`best: top`)."""
    chosen = []
    for result in (result for grid in grids for result in grid):
        if result.error is not None or result.checkpoint is None:
            continue
        best = best_checkpoint(result)
        score = max((m[METRIC] for _, m in result.best_checkpoints), default=result.metrics.get(METRIC))
        chosen.append((score, result.metrics["trial_id"], best))
    chosen.sort(key=lambda item: item[0], reverse=True)
    if evaluation.best == "top":
        chosen = chosen[:evaluation.top]
    return [(trial_id, checkpoint) for _, trial_id, checkpoint in chosen]


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
    selected = select_checkpoints(grids, space.evaluation)
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
             "k": space.evaluation.k, "images": space.evaluation.images, "evaluation_id": evaluation_id}
            for trial_id, checkpoint in selected]
    images = space.evaluation.images or "all 10,000"
    print(f"Evaluating {len(jobs)} checkpoint(s) with k={space.evaluation.k} on {images} test images "
          f"({actors} actor(s), {gpus or 0} GPU and {cpus} CPU each)", file=sys.stderr)
    try:
        evaluated = list(tqdm(pool.map_unordered(lambda actor, job: actor.evaluate.remote(job), jobs),
                              total=len(jobs), desc="k-sample evaluation", unit="checkpoint", file=sys.stderr))
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, (CheckpointError, GPUUnusable, MNISTError)):  # without Ray's traceback around it
            raise error.cause from None
        raise
    evaluated.sort(key=lambda pair: pair[0]["trial_name"])
    rows = [row for row, _ in evaluated]
    # The per-image file first: results.parquet names the evaluation_id its per-image rows carry,
    # so a crash between the two writes is detected by sweep.query rather than mixing evaluations.
    write_table(per_image_table([per_image for _, per_image in evaluated]), f"{folder}/{PER_IMAGE_FILE}", filesystem)
    path = f"{folder}/{RESULTS_FILE}"
    write_results(rows, path, filesystem)
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


class SweepFolderError(ValueError):
    """A sweep folder that cannot be resumed or evaluated as it is; the message names it and the fix."""


def write_spec(experiment_path: str, filesystem: pafs.FileSystem, space: SweepSpace, data_dir: str) -> None:
    """Written whole to a temp name, then moved into place: a crash never leaves half a spec."""
    filesystem.create_dir(experiment_path, recursive=True)
    tmp = f"{experiment_path}/.{SPEC_FILE}.{uuid.uuid4().hex}"
    with filesystem.open_output_stream(tmp) as out:
        out.write(json.dumps({"space": space.to_dict(), "data_dir": data_dir}, indent=1).encode())
    filesystem.move(tmp, f"{experiment_path}/{SPEC_FILE}")


def read_spec(experiment_path: str, filesystem: pafs.FileSystem) -> tuple[SweepSpace, str]:
    path = f"{experiment_path}/{SPEC_FILE}"
    try:
        with filesystem.open_input_stream(path) as stream:
            spec = json.loads(stream.read())
        return SweepSpace.from_dict(spec["space"]), str(spec["data_dir"])
    except FileNotFoundError:
        raise SweepFolderError(f"{experiment_path}: no {SPEC_FILE}, so this is not a sweep folder made by python -m "
                               f"sweep.run (pass <storage>/<name>)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise SweepFolderError(f"{path}: damaged ({type(error).__name__}: {str(error)[:300]}). sweep.run writes it "
                               f"when the sweep starts; restore it from a copy (the trials' checkpoints are not "
                               f"affected)") from None


def restore_tuner(experiment_path: str, filesystem: pafs.FileSystem, trainable: Any, **options: Any) -> tune.Tuner:
    """Tuner.restore with an error that names the folder instead of Ray's traceback."""
    if not tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem):
        raise SweepFolderError(f"{experiment_path}: not a Ray Tune sweep folder (no experiment state there)")
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


def _unreadable_state(experiment_path: str, error: Exception) -> SweepFolderError:
    return SweepFolderError(
        f"{experiment_path}: Ray Tune cannot read this sweep's experiment state ({type(error).__name__}: "
        f"{str(error).strip()[:300]}); it was written by another Ray version or damaged. The trials' "
        f"checkpoints are intact; restore the folder from a copy, or start a new sweep with --name")


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sweep.evaluate",
        description="Re-run a finished sweep's evaluation stage: the k-sample test log-likelihood of its best "
                    "checkpoints, written to SWEEP_DIR/" + RESULTS_FILE + " (replacing the old file).")
    parser.add_argument("sweep_dir", help="the sweep folder (<storage>/<name>), a local path or s3://... URI")
    parser.add_argument("--k", type=int, default=None, help="importance samples (default: the space file's, 5000)")
    parser.add_argument("--images", type=int, default=None,
                        help="first N test images (default: the space file's; 10000 is the whole test set)")
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
    except (ClusterError, NothingToEvaluate, CheckpointError, MNISTError) as error:
        parser.exit(1, f"error: {error}\n")
    print_results(rows, path)
    print(f"Evaluation wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
