"""Omniglot at 28x28 exactly as Burda et al. used it (`binarized_shuffled_omniglot` in their
`datasets.py`): the IWAE authors' `chardata.mat`, resized from Brenden Lake's MIT-licensed
Omniglot repository.

`data` and `testdata` ([784, N] arrays) are transposed to rows and each image is reshaped from
28x28 in Fortran order; the training rows are permuted once with numpy's RandomState(123) and
the last 1,345 of them held out for validation; binarization as for MNIST (dynamic, the test set
binarized once with the evaluation seed).
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import scipy.io
import torch

from .data import (
    DataError,
    Dataset,
    DatasetSource,
    check_binarization,
    default_data_dir,
    fetch,
    grey_levels,
    mirrors_from,
    sha256,
)

FILE = "chardata.mat"
# The git blob id (SHA-1 of b"blob <size>\0" + content) of datasets/OMNIGLOT/chardata.mat in
# yburda/iwae: a download, or a user's copy, is verified exactly against it.
GIT_BLOB = "016a3536ffe5e1d38e42563a18d7a78bfaf643ec"
GIT_BLOB_VARIABLE = "IWAE_OMNIGLOT_GIT_BLOB"  # another file's blob id, to train on a file that is not the authors'
DEFAULT_MIRRORS = ("https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/",)
MIRRORS_VARIABLE = "IWAE_OMNIGLOT_MIRRORS"
N_VALIDATION = 1345
SHUFFLE_SEED = 123


def git_blob_id(raw: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(raw) + raw).hexdigest()


def read_chardata(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """The training and test images of a chardata.mat, as float32 rows of 784 grey levels."""
    try:
        mat = scipy.io.loadmat(io.BytesIO(raw))
        train, test = (mat[key].T.astype("float32") for key in ("data", "testdata"))
    except (ValueError, KeyError, TypeError, OSError, NotImplementedError) as error:
        raise DataError(
            f"{source}: not the Omniglot chardata.mat the IWAE authors published ({type(error).__name__}: "
            f"{error}). Delete it and let it download again, or copy the authors' file there."
        ) from None
    for key, rows in (("data", train), ("testdata", test)):
        if rows.ndim != 2 or rows.shape[1] != 28 * 28 or not (0 <= rows.min() and rows.max() <= 1):
            raise DataError(
                f"{source}: '{key}' has shape {rows.T.shape} and values in [{rows.min()}, {rows.max()}]; "
                f"the authors' file has 784 rows of grey levels in [0, 1]. Copy their file there."
            )
    # Each image from 28x28 in Fortran order, as the authors' reshape_data does.
    return tuple(rows.reshape((-1, 28, 28)).reshape((-1, 28 * 28), order="F") for rows in (train, test))


def load_omniglot(
    data_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    binarization: str = "dynamic",
    download: bool = True,
    mirrors: tuple[str, ...] | None = None,
    timeout: float = 30.0,
) -> Dataset:
    check_binarization(binarization)
    folder = default_data_dir(data_dir)
    expected = os.environ.get(GIT_BLOB_VARIABLE) or GIT_BLOB

    def check(raw: bytes, source: str) -> None:
        if (blob := git_blob_id(raw)) != expected:
            raise DataError(
                f"{source}: git blob id {blob}, expected {expected} (the IWAE authors' "
                f"datasets/OMNIGLOT/chardata.mat). The file is corrupt, truncated or another version: delete it "
                f"and let it download again, or copy the authors' file there (to use this file anyway, set "
                f"{GIT_BLOB_VARIABLE}={blob}; its numbers are then not the papers')."
            )

    raw, _ = fetch(
        FILE,
        folder,
        check,
        mirrors or mirrors_from(MIRRORS_VARIABLE, DEFAULT_MIRRORS),
        download,
        timeout,
        f"Put the IWAE authors' {FILE} (github.com/yburda/iwae, datasets/OMNIGLOT) in {folder}",
    )
    train, test = read_chardata(raw, str(folder / FILE))
    train = train[np.random.RandomState(seed=SHUFFLE_SEED).permutation(len(train))]
    return grey_levels(
        "omniglot",
        torch.from_numpy(train),
        torch.from_numpy(test),
        N_VALIDATION,
        binarization,
        device,
        {FILE: sha256(raw)},
    )


class Omniglot(DatasetSource):
    name = "omniglot"
    title = "Omniglot, dynamically binarized (Burda et al. Table 1)"
    # The Cambridge replication's count of the authors' file (24,345 training rows, 8,070 test).
    splits = (23_000, N_VALIDATION, 8_070)
    files = (FILE,)
    mirrors_variable = MIRRORS_VARIABLE
    loader = staticmethod(load_omniglot)
