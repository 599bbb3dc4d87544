"""The datasets by name (`TrainConfig.dataset`): Burda et al.'s three, registered by importing
their modules, and any a plugin adds (data.DatasetSource)."""

from __future__ import annotations

import os

import torch

# The built-in datasets register as their modules are imported, in the papers' order.
# isort: off
from .data import DATASETS, Dataset
from . import omniglot  # noqa: F401
from . import binarized_mnist  # noqa: F401
# isort: on


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    binarization: str | None = None,
    download: bool = True,
) -> Dataset:
    """The registered dataset `name`, split as its DatasetSource says (Burda et al.'s splits for
    the built-in three), binarized as `binarization` says (None: the dataset's own)."""
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[name].load(data_dir, device, binarization, download)
