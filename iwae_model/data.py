"""The data a run trains on: grey levels (or bits) in [0, 1], split train / validation / test,
exactly as Burda et al. (2016) used them, and their binarization.

The datasets themselves are read by `mnist.py` (here: the LeCun IDX files), `omniglot.py` and
`binarized_mnist.py`; `datasets.load_dataset` picks one by name. The whole data set lives as one
float tensor on the training device; binarization happens there on whole batches (`binarize`).
Nothing here iterates over images in Python.

Where the files come from, in order: the `data_dir` argument (the CLIs' `--data-dir`), the
`IWAE_DATA_DIR` environment variable, then `~/.cache/iwae-sweep/data`. One folder holds every
dataset's files (their names differ). Missing files are downloaded from public mirrors into
that folder when the machine is online.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import torch

from .errors import IWAEError
from .files import write_atomically

T = TypeVar("T")

# sha256 of the *uncompressed* IDX bytes: mirrors recompress the files, so .gz hashes differ.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
DEFAULT_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
MIRRORS_VARIABLE = "IWAE_MNIST_MIRRORS"  # comma-separated URLs that replace the public mirrors (a private network's)
N_VALIDATION = 400  # Burda holds out the *last* 400 training images (datasets.py, no shuffle)
TEST_BINARIZATION_SEED = 123  # Burda's evaluation seed: one draw per test image, shared by all k samples
STATIC_BINARIZATION_SEED = 0

BINARIZATIONS = ("dynamic", "static", "threshold")  # dynamic is the papers' protocol
# Burda et al.'s three: MNIST and Omniglot (Table 1, dynamically binarized), and Larochelle &
# Murray's fixed binarization of MNIST (their appendix).
DATASETS = ("mnist", "omniglot", "binarized_mnist")


class DataError(IWAEError, RuntimeError):
    """A data file is missing, corrupt or could not be fetched; the message says what to do."""


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser().resolve()
    if os.environ.get("IWAE_DATA_DIR"):
        return Path(os.environ["IWAE_DATA_DIR"]).expanduser().resolve()
    return Path.home() / ".cache" / "iwae-sweep" / "data"


def sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def mirrors_from(variable: str, defaults: tuple[str, ...]) -> tuple[str, ...]:
    """The mirrors a comma-separated environment variable names (a private network's), else `defaults`."""
    return tuple(filter(None, os.environ.get(variable, "").split(","))) or defaults


def fetch(
    name: str,
    folder: Path,
    check: Callable[[bytes, str], T],
    mirrors: tuple[str, ...],
    download: bool,
    timeout: float,
    where: str,
    gzipped: bool = False,
) -> tuple[bytes, T]:
    """The bytes of data file `name` and what `check(raw, source)` makes of them (it raises
    DataError for bad bytes): from `folder` (as `name`, or `name.gz` when `gzipped`), else from
    the first of `mirrors` that serves good bytes, which are then kept in `folder`. `where`: what
    to put where, for the errors."""
    for candidate in (folder / name, *([folder / f"{name}.gz"] if gzipped else [])):
        if not candidate.exists():
            continue
        raw = candidate.read_bytes()
        if candidate.suffix == ".gz":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as exc:
                raise DataError(
                    f"{candidate}: not a readable gzip file ({exc}). Delete it and let it "
                    f"download again, or copy the original '{name}.gz' there."
                ) from exc
        return raw, check(raw, str(candidate))
    if not download:
        raise DataError(
            f"'{name}' is not in {folder}. {where}, or point --data-dir / IWAE_DATA_DIR at a folder that has them."
        )
    errors = []
    for mirror in mirrors:
        url = f"{mirror.rstrip('/')}/{name}{'.gz' if gzipped else ''}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                fetched = response.read()
            raw = gzip.decompress(fetched) if gzipped else fetched
            checked = check(raw, url)
        except (urllib.error.URLError, OSError, EOFError, DataError) as exc:
            errors.append(f"  {url}: {exc}")
            continue
        # Only checked bytes, and whole: never a half-written file where the next run finds it.
        write_atomically(folder / f"{name}{'.gz' if gzipped else ''}", lambda out, fetched=fetched: out.write(fetched))
        return raw, checked
    raise DataError(
        f"'{name}' is not in {folder} and could not be downloaded:\n"
        + "\n".join(errors)
        + f"\n{where}, or point --data-dir / IWAE_DATA_DIR at a folder that has them."
    )


def _parse_idx(raw: bytes, name: str) -> np.ndarray:
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"'{name}' is not an unsigned-byte IDX file (header {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_mnist_file(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    mirrors: tuple[str, ...] | None = None,
    timeout: float = 10.0,
) -> np.ndarray:
    """One verified MNIST IDX file as a uint8 array (images `[N, 28, 28]`, labels `[N]`).
    `mirrors`: where to download from (default: $IWAE_MNIST_MIRRORS, else the public ones)."""
    folder = default_data_dir(data_dir)

    def check(raw: bytes, source: str) -> None:
        if (digest := sha256(raw)) != MNIST_SHA256[name]:
            raise DataError(
                f"{source}: uncompressed content has sha256 {digest}, expected {MNIST_SHA256[name]} "
                f"(the original LeCun '{name}'). The file is corrupt, truncated or a different data set: "
                f"delete it and let it download again, or copy the original file there."
            )

    raw, _ = fetch(
        name,
        folder,
        check,
        mirrors or mirrors_from(MIRRORS_VARIABLE, DEFAULT_MIRRORS),
        download,
        timeout,
        f"Put the four MNIST IDX files (gzipped or not) in {folder}",
        gzipped=True,
    )
    return _parse_idx(raw, name)


@dataclass
class Dataset:
    """One dataset's splits, flattened to [N, pixels], on one device, and how batches become
    binary (`binarization`): `dynamic` (a fresh draw every time: Burda's protocol for MNIST and
    Omniglot), `static` / `threshold` (the training set binarized once at load: overfits, NOT
    comparable to the papers), or `fixed` (the files hold bits already: Larochelle & Murray's
    MNIST, whose fixed draw is the protocol)."""

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    binarization: str = "dynamic"
    files: dict[str, str] = field(default_factory=dict)  # each file read: the SHA-256 of its (uncompressed) bytes
    train_labels: torch.Tensor | None = None  # MNIST's digit classes, for plots only: training never sees them
    test_labels: torch.Tensor | None = None

    @property
    def as_in_papers(self) -> bool:
        return self.binarization in ("dynamic", "fixed")

    def training_batch(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.binarization == "dynamic":
            return binarize(batch, generator)
        return batch  # binary already: binarized once at load time, or in the files

    def binarized_once(self, split: Literal["train", "valid", "test"]) -> torch.Tensor:
        """A split binarized once with Burda's evaluation seed (123): the same bits on every
        device and every call, so evaluations of different models see the same test set."""
        images = getattr(self, split)
        if self.binarization == "fixed" or (self.binarization != "dynamic" and split == "train"):
            return images
        return binarize_once(images, TEST_BINARIZATION_SEED)


def check_binarization(binarization: str) -> None:
    if binarization not in BINARIZATIONS:
        raise ValueError(
            f"binarization={binarization!r}: use 'dynamic' (the papers' protocol), 'static' or 'threshold'"
        )


def grey_levels(
    name: str,
    train_all: torch.Tensor,
    test: torch.Tensor,
    n_validation: int,
    binarization: str,
    device: torch.device | str,
    files: dict[str, str],
    **labels: torch.Tensor,
) -> Dataset:
    """A grey-level dataset (values in [0, 1]) split as Burda did: the last `n_validation`
    training rows are the validation set. `static` (one fixed Bernoulli draw, seed 0) and
    `threshold` (pixel > 0.5) binarize the training set once; validation and test sets are
    always binarized once with seed 123 (see `Dataset.fixed`)."""
    if len(train_all) <= n_validation:
        raise DataError(
            f"{name}: {len(train_all)} training images, but the last {n_validation} are the validation "
            f"set: the file is not the dataset's"
        )
    train, valid = train_all[:-n_validation], train_all[-n_validation:]
    if binarization == "static":
        train = binarize_once(train, STATIC_BINARIZATION_SEED)
    elif binarization == "threshold":
        train = (train > 0.5).float()
    device = torch.device(device)
    return Dataset(
        name,
        train.to(device),
        valid.to(device),
        test.to(device),
        binarization,
        files,
        **{key: value.to(device) for key, value in labels.items()},
    )


def binarize(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each pixel 1 with probability equal to its grey level, drawn on the images' device.
    U < p with U uniform on [0, 1) is exactly Bernoulli(p), also at p = 0 and p = 1, and is
    three times faster than torch.bernoulli on the CPU."""
    uniform = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return (uniform < images).to(images.dtype)


def binarize_once(images: torch.Tensor, seed: int) -> torch.Tensor:
    # Drawn on the CPU so that the bits do not depend on the device the model runs on.
    return binarize(images.cpu(), torch.Generator().manual_seed(seed)).to(images.device)


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    binarization: str = "dynamic",
    download: bool = True,
    mirrors: tuple[str, ...] | None = None,
) -> Dataset:
    """Burda's split: train = first 59,600 training images, valid = last 400, test = 10,000
    (see `grey_levels` for the binarizations)."""
    check_binarization(binarization)  # before reading the files
    train_images, train_labels, test_images, test_labels = (
        torch.from_numpy(read_mnist_file(name, data_dir, download, mirrors).copy()) for name in MNIST_SHA256
    )
    train_all, test = (images.reshape(len(images), -1).float() / 255.0 for images in (train_images, test_images))
    return grey_levels(
        "mnist",
        train_all,
        test,
        N_VALIDATION,
        binarization,
        device,
        dict(MNIST_SHA256),
        train_labels=train_labels[:-N_VALIDATION].long(),
        test_labels=test_labels.long(),
    )
