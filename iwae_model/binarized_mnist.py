"""MNIST with Larochelle & Murray's (2011) fixed binarization, exactly as Burda et al. used it
(`binarized_mnist_fixed_binarization` in their `datasets.py`).

The three text files `binarized_mnist_{train,valid,test}.amat` hold 50,000 / 10,000 / 10,000
rows of 784 zeros and ones. Train and valid are concatenated and the last 10,000 rows held out
for validation (so the validation set is the valid file); nothing is binarized at training or
test time. No checksum of these files is published: each is checked for its structure, and its
SHA-256 goes into every result, so two results can say whether they used the same files.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .data import FIXED, DataError, Dataset, DatasetSource, default_data_dir, fetch, mirrors_from, sha256

ROWS = {"binarized_mnist_train.amat": 50_000, "binarized_mnist_valid.amat": 10_000, "binarized_mnist_test.amat": 10_000}
PIXELS = 784
N_VALIDATION = 10_000
DEFAULT_MIRRORS = ("http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/",)
MIRRORS_VARIABLE = "IWAE_BINARIZED_MNIST_MIRRORS"
_ZERO, _ONE = ord("0"), ord("1")
_WHITESPACE = tuple(map(ord, " \t\r\n"))


def read_amat(raw: bytes, source: str, rows: int) -> np.ndarray:
    """A .amat file's rows as a float32 [rows, 784] array of 0 and 1; DataError unless the file is
    exactly that: `rows` lines of 784 whitespace-separated values, each 0 or 1."""

    def damaged(what: str) -> DataError:
        return DataError(
            f"{source}: {what}; Larochelle & Murray's file has {rows:,} lines of {PIXELS} values, each "
            f"0 or 1. The file is corrupt, truncated or another file: delete it and let it download "
            f"again, or copy the original there."
        )

    data = np.frombuffer(raw.rstrip(), dtype=np.uint8)
    digit = (data == _ZERO) | (data == _ONE)
    if not (digit | np.isin(data, _WHITESPACE)).all():
        offset = int(np.flatnonzero(~(digit | np.isin(data, _WHITESPACE)))[0])
        raise damaged(f"byte {offset} is {raw[offset : offset + 1]!r}, not 0, 1 or whitespace")
    if (digit[1:] & digit[:-1]).any():
        raise damaged("it has a value of several digits")
    line_ends = np.append(np.flatnonzero(data == ord("\n")), len(data))
    values_before = np.concatenate([[0], np.cumsum(digit)])[line_ends]
    per_line = np.diff(values_before, prepend=0)
    if len(per_line) != rows:
        raise damaged(f"it has {len(per_line):,} lines")
    if (wrong := np.flatnonzero(per_line != PIXELS)).size:
        raise damaged(f"line {wrong[0] + 1} has {per_line[wrong[0]]} values")
    return (data[digit] - _ZERO).astype(np.float32).reshape(rows, PIXELS)


def load_binarized_mnist(
    data_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    binarization: str = FIXED,
    download: bool = True,
    mirrors: tuple[str, ...] | None = None,
    timeout: float = 60.0,
) -> Dataset:
    """Larochelle & Murray's bits, used as they are: `binarization` takes only its default."""
    if binarization != FIXED:
        raise ValueError(f"binarization={binarization!r}: binarized_mnist is binary already; its binarization is fixed")
    folder = default_data_dir(data_dir)
    mirrors = mirrors or mirrors_from(MIRRORS_VARIABLE, DEFAULT_MIRRORS)
    splits, files = [], {}
    for name, rows in ROWS.items():
        raw, images = fetch(
            name,
            folder,
            lambda raw, source, rows=rows: read_amat(raw, source, rows),
            mirrors,
            download,
            timeout,
            f"Put Larochelle & Murray's three binarized_mnist_*.amat files in {folder}",
        )
        splits.append(torch.from_numpy(images))
        files[name] = sha256(raw)
    train, valid, test = splits
    train_all = torch.cat([train, valid])
    device = torch.device(device)
    return Dataset(
        "binarized_mnist",
        train_all[:-N_VALIDATION].to(device),
        train_all[-N_VALIDATION:].to(device),
        test.to(device),
        FIXED,
        files,
    )


class BinarizedMNIST(DatasetSource):
    name = "binarized_mnist"
    title = "MNIST, Larochelle & Murray's fixed binarization (Burda et al. Appendix D)"
    splits = (50_000, N_VALIDATION, 10_000)
    files = tuple(ROWS)
    binary = True
    mirrors_variable = MIRRORS_VARIABLE
    loader = staticmethod(load_binarized_mnist)
