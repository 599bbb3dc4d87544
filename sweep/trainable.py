"""The Ray Tune function trainable: one trial trains one iwae_model configuration and seed.

Each pass it reports the run's metrics row and, every `checkpoint_every` passes (and at the
last), a Ray checkpoint holding `checkpoint.pt` (model, optimizer, schedule position, the
training generator's state and the whole per-pass history), `metrics.jsonl` and `nodes.json`
(every node the trial ran on, its device and from which pass). That checkpoint, not Ray's
result.json, is the scientific record: the Parquet results are built from it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from torch.utils.tensorboard import SummaryWriter

from iwae_model import Dataset, IWAEModel, TrainConfig
from iwae_model.checkpoint import CheckpointError, load_checkpoint
from iwae_model.data import DataError
from iwae_model.datasets import DATASETS, load_dataset
from iwae_model.device import device_record, pin_float32
from iwae_model.files import held_folder, remove_abandoned_folders, write_atomically
from iwae_model.plugins import load_recorded
from iwae_model.training import TrainingRun

from .cluster import gpus_advertised_only, ray_device, this_node, verify_storage_marker
from .ray_private import quiet_checkpoint_logging
from .trials import NODES_FILE, read_nodes, trial_config

IMAGE_GRID = 8  # 8 x 8 samples and 8 x 8 reconstructions (left: data, right: reconstruction)
IMAGE_SNAPSHOTS = 10  # image grids per trial, spread evenly over its passes
TENSORBOARD_DIR = "."  # the trial's working dir, uploaded into its folder with each checkpoint: one run
CHECKPOINT_FOLDER = "iwae_checkpoint_"  # in the temp dir: a checkpoint written there before Ray copies it


def trial_metrics(row: dict) -> dict[str, float | int]:
    """A metrics row as Ray scalars: Nones dropped, active units one scalar per layer, the SNR
    summaries as snr_encoder_mean, ..."""
    metrics = {key: value for key, value in row.items() if value is not None and key not in ("active_units", "snr")}
    for layer, units in enumerate(row["active_units"], start=1):
        metrics[f"active_units_L{layer}"] = units
    metrics["active_units"] = sum(row["active_units"])
    metrics.update({f"snr_{name}": value for name, value in (row.get("snr") or {}).items()})
    return metrics


# The per-pass figures TensorBoard shows, by tag: a few groups a reader scans (TrialCurves).
CURVE_TAGS = {
    "train_bound": "bound/train",
    "valid_bound": "bound/valid",
    "test_bound": "bound/test",
    "valid_ll": "likelihood/valid_ll",
    "test_nll": "likelihood/test_nll",
    "active_units": "active_units/all",
    "lr": "optimizer/lr",
    "images_per_s": "speed/images_per_s",
}


def curves(result: dict) -> dict[str, float]:
    """The curves in a trial's reported result (`trial_metrics`), by TensorBoard tag."""
    tags = {CURVE_TAGS[key]: value for key, value in result.items() if key in CURVE_TAGS}
    for key, value in result.items():
        if key.startswith("active_units_L"):
            tags[f"active_units/{key.removeprefix('active_units_')}"] = value
        elif key.startswith("snr_"):
            tags[f"snr/{key.removeprefix('snr_')}"] = value
    return tags


def image_grid(images: torch.Tensor, columns: int, shape: tuple[int, int]) -> torch.Tensor:
    """`[N, H*W]` images in [0, 1] of `shape` (H, W) as one `[1, rows*H, columns*W]` grid."""
    rows, (height, width) = images.shape[0] // columns, shape
    grid = images[: rows * columns].reshape(rows, columns, height, width).permute(0, 2, 1, 3)
    return grid.reshape(1, rows * height, columns * width)


def write_images(writer: SummaryWriter, model: IWAEModel, data: Dataset, epoch: int) -> None:
    generator = torch.Generator(device=data.test.device).manual_seed(0)
    samples = model.sample(IMAGE_GRID * IMAGE_GRID, generator)
    x = data.binarized_once("test")[: IMAGE_GRID * IMAGE_GRID // 2]
    pairs = torch.stack([x, model.reconstruct(x)], dim=1).reshape(-1, x.shape[1])
    shape = DATASETS[data.name].shape
    writer.add_image("samples", image_grid(samples.cpu(), IMAGE_GRID, shape), epoch)
    writer.add_image("reconstructions", image_grid(pairs.cpu(), IMAGE_GRID, shape), epoch)
    writer.flush()


def load_node_data(config: TrainConfig, data_dir: str, device: torch.device) -> Dataset:
    """The run's dataset on the node this runs on: a node without the files downloads them
    (verified), so workers need no shared disk; one that cannot is named in the error."""
    try:
        return load_dataset(config.dataset, data_dir, device, config.binarization, download=True)
    except DataError as error:
        node = this_node()
        raise DataError(
            f"on node {node['hostname']} ({node['node_ip']}, Ray node {node['node_id']}): {error}\nEvery "
            f"node needs {config.dataset} at {data_dir} or a way to download it: put it on a mount every "
            f"node shares at that path or copy it there in the cluster's setup_commands"
            + (
                f", or set {variable} to a mirror the nodes reach (e.g. your bucket's https URL)"
                if (variable := DATASETS[config.dataset].mirrors_variable)
                else ""
            )
        ) from None


def forget_earlier_trials(device: torch.device) -> None:
    """Start a trial in a reused worker process (the sweep's reuse_actors) as in a new one: the
    graphs torch.compile made for earlier trials dropped (dynamo counts them against its recompile
    limit, past which it runs eager without a word), and on CUDA the memory they cached freed."""
    torch.compiler.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_trial(config: dict[str, Any]) -> None:
    """Ray Tune entry point. `config`: {"train": TrainConfig dict, "search": the values a search
    drew (replacing train's; absent in a grid), "data_dir": absolute path,
    "checkpoint_every": passes, "init_checkpoint": the parent's checkpoint of a stage-2 trial (else
    None), "storage_marker": the sweep folder's marker on a local-path storage, else None,
    "plugins": the records of the plugins defining objectives}."""
    quiet_checkpoint_logging()
    if config.get("storage_marker"):  # this node may have joined after the driver checked the others
        verify_storage_marker(config["storage_marker"])
    for record in config.get("plugins") or []:
        load_recorded(record, "this trial", shipped=True)
    train_config = trial_config(config)
    pin_float32()
    device = ray_device()
    forget_earlier_trials(device)
    here = {
        **this_node(),
        **device_record(device),
        "ray_gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
        "gpus_advertised_only": gpus_advertised_only(),
        "started_at": time.time(),
    }
    data = load_node_data(train_config, config["data_dir"], device)
    nodes: list[dict] = []
    if (checkpoint := tune.get_checkpoint()) is not None:  # a retry or a resumed sweep
        with checkpoint.as_directory() as folder:  # read through the storage filesystem, wherever it lies
            run = TrainingRun.resume(train_config, data, device, load_checkpoint(folder, device), folder)
            nodes = read_nodes(Path(folder) / NODES_FILE)
    elif train_config.init_from is not None:  # a continued stage's trial: never from random weights
        if (parent := config.get("init_checkpoint")) is None:
            raise CheckpointError(
                f"{train_config.label()}: a continued trial without its parent's checkpoint in its "
                f"configuration (a sweep started by another iwae-sweep version?); resume it with "
                f"the version that started it, or start the sweep again under another --name"
            )
        with parent.as_directory() as folder:
            run = TrainingRun.start(train_config, data, device, load_checkpoint(folder, device))
    else:
        run = TrainingRun.start(train_config, data, device)
    with SummaryWriter(TENSORBOARD_DIR) as writer:
        while not run.done:
            run.train_pass()
            row = run.measure()
            if "first_epoch" not in here:  # this run's first pass: where it runs, in the record and TensorBoard
                here.update(first_epoch=run.epoch, generator_reseeded=row["generator_reseeded"])
                nodes.append(here)
                writer.add_text("run/node", node_text(here), run.epoch)
            report(run, row, nodes, writer, config["checkpoint_every"])


def node_text(here: dict[str, Any]) -> str:
    gpu = f" ({here['gpu_name']}, compute capability {here['gpu_capability']})" if here["gpu_name"] else ""
    reseeded = ", generator reseeded: not bit-identical from here on" if here["generator_reseeded"] else ""
    return (
        f"passes from {here['first_epoch']} on {here['hostname']} ({here['node_ip']}, Ray node {here['node_id']}), "
        f"device {here['device']}{gpu}, float32 {here['float32']}, Ray GPU ids {here['ray_gpu_ids'] or 'none'}"
        f"{reseeded}"
    )


def report(run: TrainingRun, row: dict, nodes: list[dict], writer: SummaryWriter, checkpoint_every: int) -> None:
    """The pass to Ray (with a checkpoint every `checkpoint_every` passes and at the last) and to
    the trial's TensorBoard (image grids spread over the run; the curves are the driver's)."""
    epoch, last = run.epoch, run.done
    if epoch % max(1, run.config.passes // IMAGE_SNAPSHOTS) == 0 or last:
        write_images(writer, run.model, run.data, epoch)
    if epoch % checkpoint_every and not last:
        tune.report(trial_metrics(row))
        return
    # Outside the working dir, which Ray uploads with every checkpoint (sync_artifacts); Ray copies
    # the folder before it is deleted, so it needs no fsync. A killed trial's folder (one per
    # checkpoint) is removed by the next checkpoint made on its node.
    remove_abandoned_folders(CHECKPOINT_FOLDER)
    with held_folder(CHECKPOINT_FOLDER) as folder:
        run.save(folder, durable=False)
        write_atomically(Path(folder) / NODES_FILE, lambda out: out.write(json.dumps(nodes).encode()), durable=False)
        tune.report(trial_metrics(row), checkpoint=tune.Checkpoint.from_directory(folder))
