"""Burda et al.'s three datasets by name (`TrainConfig.dataset`)."""

from __future__ import annotations

import os

import torch

from . import binarized_mnist, data, omniglot
from .binarized_mnist import load_binarized_mnist
from .data import DATASETS, Dataset, load_mnist
from .omniglot import load_omniglot

# (train, validation, test) images of each, for plans made without reading the files. Omniglot's
# are the Cambridge replication's count of the authors' file (24,345 training rows, 8,070 test).
SPLIT_SIZES = {
    "mnist": (59_600, 400, 10_000),
    "omniglot": (23_000, 1_345, 8_070),
    "binarized_mnist": (50_000, 10_000, 10_000),
}
# The environment variable that names each dataset's download mirrors (a private network's).
MIRRORS_VARIABLES = {
    "mnist": data.MIRRORS_VARIABLE,
    "omniglot": omniglot.MIRRORS_VARIABLE,
    "binarized_mnist": binarized_mnist.MIRRORS_VARIABLE,
}


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    binarization: str = "dynamic",
    download: bool = True,
) -> Dataset:
    """`mnist`, `omniglot` or `binarized_mnist` (train / validation / test: SPLIT_SIZES), split as
    Burda et al. did."""
    if name == "mnist":
        return load_mnist(data_dir, device, binarization, download)
    if name == "omniglot":
        return load_omniglot(data_dir, device, binarization, download)
    if name == "binarized_mnist":
        return load_binarized_mnist(data_dir, device, download)
    raise ValueError(f"dataset={name!r}: choose one of {', '.join(DATASETS)}")
