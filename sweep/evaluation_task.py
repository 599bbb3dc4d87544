"""The evaluation of one checkpoint as a Ray task: its results row and per-image columns, on the
device Ray gave the task; with `evaluation.ais`, AIS after the IS estimate, on its first images."""

from __future__ import annotations

import functools
import uuid
from pathlib import Path
from typing import Any

import ray
import torch

from iwae_model import Dataset
from iwae_model.ais import ais_beside_is
from iwae_model.checkpoint import CHECKPOINT_NAME, CheckpointError, load_model
from iwae_model.datasets import load_dataset
from iwae_model.device import pin_float32
from iwae_model.errors import IWAEError
from iwae_model.evaluation import evaluate_model
from iwae_model.plugins import load_recorded

from .cluster import ray_device, this_node
from .evaluation_jobs import EvaluationJob
from .results import EvaluationRecord, per_image_part, results_row
from .trials import NODES_FILE, read_nodes, trial_name


@functools.lru_cache(maxsize=2)
def _dataset(name: str, data_dir: str, device: str, binarization: str) -> Dataset:
    return load_dataset(name, data_dir, torch.device(device), binarization)  # kept for the worker's next task


def evaluate_checkpoint(job: EvaluationJob) -> tuple[dict[str, Any], dict[str, Any]]:
    """(results row, per-image columns) of one checkpoint, on the device Ray gave this task."""
    torch.set_num_threads(job.threads)
    pin_float32()
    device = ray_device()
    for record in job.plugins:
        load_recorded(record, f"the evaluation of {job.uri}", shipped=True)
    with job.checkpoint.as_directory() as folder:  # on object storage: downloaded to /tmp
        try:
            model, config, state = load_model(Path(folder) / CHECKPOINT_NAME, device)
            nodes = read_nodes(Path(folder) / NODES_FILE)
        except CheckpointError as error:  # name the file where the user finds it, not the /tmp copy
            raise CheckpointError(str(error).replace(folder, job.uri)) from None
    data = _dataset(config.dataset, job.data_dir, str(device), config.binarization)
    result = evaluate_model(model, data, config.build_objective(), job.k, job.images)
    ais = None
    if job.ais:
        # IS noise is drawn per image, so its first n estimates are those of an n-image evaluation.
        n = job.ais.images_of(result.images)
        is_ll = result.per_image["log_likelihood"][:n]
        ais = ais_beside_is(model, data.binarized_once("test")[:n], is_ll, job.ais.steps, job.ais.chains, job.ais.start)
    record = EvaluationRecord(
        job.sweep,
        job.trial_id,
        trial_name(config, job.searched, job.trial_id),
        job.uri,
        uuid.uuid4().hex,
        config,
        state,
        nodes,
        this_node(),
        job.metric,
        list(job.searched),
    )
    return results_row(record, result, ais), per_image_part(record, result, ais)


# A GPU task's worker is not reused (Ray's default for a function declared with GPUs, which
# .options() does not give): a reused one would keep its first task's CUDA_VISIBLE_DEVICES, its
# CUDA context and the test set cached on the GPU, beside the trials that now share that GPU.
_ON_CPU = ray.remote(evaluate_checkpoint)
_ON_GPU = ray.remote(max_calls=1)(evaluate_checkpoint)


def submit(job: EvaluationJob, cpus: float, gpus: float) -> ray.ObjectRef:
    return (_ON_GPU if gpus else _ON_CPU).options(num_cpus=cpus, num_gpus=gpus).remote(job)


def result_of(ref: ray.ObjectRef) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, IWAEError):  # without Ray's traceback around it
            raise error.cause from None
        raise
