"""MNIST as Burda et al. (2016) used it: IDX files, verified, split 59,600 / 400 / 10,000.

The whole data set lives as one float tensor of grey levels in [0, 1] on the training
device; binarization happens there on whole batches (`binarize`). Nothing here iterates
over images in Python.

Where the files come from, in order: the `data_dir` argument (the CLIs' `--data-dir`), the
`IWAE_DATA_DIR` environment variable, then `~/.cache/iwae-sweep/mnist`. Missing files are
downloaded from public mirrors into that folder when the machine is online.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .errors import IWAEError
from .files import write_atomically

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


class MNISTError(IWAEError, RuntimeError):
    """A data file is missing, corrupt or could not be fetched; the message says what to do."""


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser().resolve()
    if os.environ.get("IWAE_DATA_DIR"):
        return Path(os.environ["IWAE_DATA_DIR"]).expanduser().resolve()
    return Path.home() / ".cache" / "iwae-sweep" / "mnist"


def _verified(name: str, raw: bytes, source: Path | str) -> bytes:
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST_SHA256[name]:
        raise MNISTError(
            f"{source}: uncompressed content has sha256 {digest}, expected {MNIST_SHA256[name]} "
            f"(the original LeCun '{name}'). The file is corrupt, truncated or a different data set: "
            f"delete it and let it download again, or copy the original file there."
        )
    return raw


def _read_local(name: str, folder: Path) -> bytes | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if not candidate.exists():
            continue
        raw = candidate.read_bytes()
        if candidate.suffix == ".gz":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as exc:
                raise MNISTError(
                    f"{candidate}: not a readable gzip file ({exc}). Delete it and let it "
                    f"download again, or copy the original '{name}.gz' there."
                ) from exc
        return _verified(name, raw, candidate)
    return None


def _download(name: str, folder: Path, mirrors: tuple[str, ...], timeout: float) -> bytes:
    errors = []
    for mirror in mirrors:
        url = f"{mirror.rstrip('/')}/{name}.gz"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                compressed = response.read()
            raw = _verified(name, gzip.decompress(compressed), url)
        except (urllib.error.URLError, OSError, EOFError, MNISTError) as exc:
            errors.append(f"  {url}: {exc}")
            continue
        # Only verified bytes, and whole: never a half-written file where the next run finds it.
        write_atomically(folder / f"{name}.gz", lambda out: out.write(compressed))
        return raw
    raise MNISTError(
        f"'{name}' is not in {folder} and could not be downloaded:\n" + "\n".join(errors) +
        f"\nPut the four MNIST IDX files (gzipped or not) in {folder}, or point --data-dir / "
        f"IWAE_DATA_DIR at a folder that has them."
    )


def _parse_idx(raw: bytes, name: str) -> np.ndarray:
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise MNISTError(f"'{name}' is not an unsigned-byte IDX file (header {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
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
    raw = _read_local(name, folder)
    if raw is None:
        if not download:
            raise MNISTError(
                f"'{name}' (or '{name}.gz') is not in {folder}. Put the four MNIST IDX files "
                f"there, or point --data-dir / IWAE_DATA_DIR at a folder that has them."
            )
        if mirrors is None:
            mirrors = tuple(filter(None, os.environ.get(MIRRORS_VARIABLE, "").split(","))) or DEFAULT_MIRRORS
        raw = _download(name, folder, mirrors, timeout)
    return _parse_idx(raw, name)


@dataclass
class MNIST:
    """Grey levels in [0, 1], flattened to 784, on one device. `binarization` says how batches
    become binary: `dynamic` (Burda's protocol, a fresh draw every time) is the only setting
    whose numbers can be compared with the papers."""

    train: torch.Tensor  # [59600, 784]
    valid: torch.Tensor  # [400, 784]
    test: torch.Tensor  # [10000, 784]
    train_labels: torch.Tensor  # [59600] digit classes, for plots only: training never sees them
    test_labels: torch.Tensor  # [10000]
    binarization: str = "dynamic"

    def training_batch(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.binarization == "dynamic":
            return binarize(batch, generator)
        return batch  # already binarized once at load time

    def fixed(self, split: Literal["train", "valid", "test"]) -> torch.Tensor:
        """A split binarized once with Burda's evaluation seed (123): the same bits on every
        device and every call, so evaluations of different models see the same test set."""
        images = getattr(self, split)
        if self.binarization != "dynamic" and split == "train":
            return images
        return binarize_once(images, TEST_BINARIZATION_SEED)


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
) -> MNIST:
    """Burda's split: train = first 59,600 training images, valid = last 400, test = 10,000.

    `static` (one fixed Bernoulli draw, seed 0) and `threshold` (pixel > 0.5) binarize the
    training set once; both overfit and are NOT comparable with the papers' dynamic numbers.
    Validation and test sets are always binarized once with seed 123 (see `MNIST.fixed`)."""
    if binarization not in BINARIZATIONS:
        raise ValueError(
            f"binarization={binarization!r}: use 'dynamic' (the papers' protocol), 'static' or 'threshold'"
        )
    train_images, train_labels, test_images, test_labels = (
        torch.from_numpy(read_mnist_file(name, data_dir, download, mirrors).copy()) for name in MNIST_SHA256
    )
    train_all, test = (images.reshape(len(images), -1).float() / 255.0 for images in (train_images, test_images))
    train, valid = train_all[:-N_VALIDATION], train_all[-N_VALIDATION:]
    if binarization == "static":
        train = binarize_once(train, STATIC_BINARIZATION_SEED)
    elif binarization == "threshold":
        train = (train > 0.5).float()
    device = torch.device(device)
    return MNIST(
        train.to(device), valid.to(device), test.to(device),
        train_labels[:-N_VALIDATION].long().to(device), test_labels.long().to(device), binarization,
    )
