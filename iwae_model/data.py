"""The data a run trains on: grey levels (or bits) in [0, 1], split train / validation / test,
exactly as Burda et al. (2016) used them, and their binarization.

A dataset is a DatasetSource subclass (`DATASETS` by name): MNIST here (the LeCun IDX files),
Omniglot in `omniglot.py`, Larochelle & Murray's MNIST in `binarized_mnist.py`, a researcher's
own in a plugin (iwae_model.plugins); `datasets.load_dataset` picks one by name. The whole data
set lives as one float tensor on the training device; binarization happens there on whole
batches (`binarize`). Nothing here iterates over images in Python.

Where the files come from, in order: the `data_dir` argument (the CLIs' `--data-dir`), the
`IWAE_DATA_DIR` environment variable, then `~/.cache/iwae-sweep/data`. One folder holds every
dataset's files (their names differ). Missing files are downloaded from public mirrors into
that folder when the machine is online.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import struct
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

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

BINARIZATIONS = ("dynamic", "static", "threshold")  # of grey levels; dynamic is the papers' protocol
FIXED = "fixed"  # a binary dataset's: its files' bits, used as they are


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
        return self.binarization in ("dynamic", FIXED)

    def training_batch(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.binarization == "dynamic":
            return binarize(batch, generator)
        return batch  # binary already: binarized once at load time, or in the files

    def binarized_once(self, split: Literal["train", "valid", "test"]) -> torch.Tensor:
        """A split binarized once with Burda's evaluation seed (123): the same bits on every
        device and every call, so evaluations of different models see the same test set."""
        images = getattr(self, split)
        if self.binarization == FIXED or (self.binarization != "dynamic" and split == "train"):
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
    training rows are the validation set (see `grey_splits` for the binarizations)."""
    if len(train_all) <= n_validation:
        raise DataError(
            f"{name}: {len(train_all)} training images, but the last {n_validation} are the validation "
            f"set: the file is not the dataset's"
        )
    train, valid = train_all[:-n_validation], train_all[-n_validation:]
    return grey_splits(name, train, valid, test, binarization, device, files, **labels)


def grey_splits(
    name: str,
    train: torch.Tensor,
    valid: torch.Tensor,
    test: torch.Tensor,
    binarization: str,
    device: torch.device | str,
    files: dict[str, str],
    **labels: torch.Tensor,
) -> Dataset:
    """Grey-level splits as a Dataset: `static` (one fixed Bernoulli draw, seed 0) and
    `threshold` (pixel > 0.5) binarize the training set once; validation and test sets are
    always binarized once with seed 123 (see `Dataset.binarized_once`)."""
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


DATASETS: dict[str, type[DatasetSource]] = {}  # by name, in the order they were defined


class DatasetSource:
    """A dataset by name, declared once: everything that names datasets (TrainConfig, space
    files, plans, the query's tables) reads DATASETS, where a subclass with a `name` registers
    itself. It declares:
      name       the `dataset` setting's value
      title      the heading of its table in the query
      splits     (training, validation, test) images, for plans and checks made without the files
      files      its files in the data folder
      shape      an image's (height, width): rows hold height * width pixels, row-major
      binary     the files hold bits, used as they are (binarization `fixed`); else grey levels
                 in [0, 1], binarized as the `binarization` setting says
      published  published test NLLs for the query's tables: {paper, objective, layers, m, k,
                 nll} each (and active_units, beta, estimator where they matter)
    and implements `read(folder)` -> (train, valid, test) arrays [N, D]; `load` checks the files,
    shapes and values and binarizes. The built-ins have a `loader` of their own instead (they
    download and verify their files against known checksums)."""

    name: ClassVar[str]
    title: ClassVar[str]
    splits: ClassVar[tuple[int, int, int]]
    files: ClassVar[tuple[str, ...]] = ()
    shape: ClassVar[tuple[int, int]] = (28, 28)
    binary: ClassVar[bool] = False
    mirrors_variable: ClassVar[str | None] = None  # the variable naming download mirrors, if it has any
    published: ClassVar[tuple[dict[str, Any], ...]] = ()
    # load_*(data_dir, device, binarization, download) of a built-in: instead of read
    loader: ClassVar[Callable[..., Dataset] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            _register_dataset(cls)

    @classmethod
    def binarizations(cls) -> tuple[str, ...]:
        """What its `binarization` setting may be, its default (the papers' protocol) first."""
        return (FIXED,) if cls.binary else BINARIZATIONS

    @classmethod
    def read(cls, folder: Path) -> tuple[Any, Any, Any]:
        """(train, valid, test), each [N, D] grey levels in [0, 1] (or bits), from `folder`."""
        raise NotImplementedError

    @classmethod
    def load(
        cls,
        data_dir: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        binarization: str | None = None,
        download: bool = True,
    ) -> Dataset:
        """Its splits on `device` (`binarization` None: its own), each file's SHA-256 recorded;
        a DataError naming the file or split and the fix for missing files or data that is not what
        it declares."""
        binarization = binarization or cls.binarizations()[0]
        if cls.loader is not None:
            return cls.loader(data_dir, device, binarization, download)
        if binarization not in cls.binarizations():
            raise ValueError(f"binarization={binarization!r}: dataset {cls.name!r} takes {cls.binarizations()}")
        folder = default_data_dir(data_dir)
        missing = [name for name in cls.files if not (folder / name).is_file()]
        if missing:
            raise DataError(
                f"dataset {cls.name}: {', '.join(missing)} not in {folder}: put the files there, or name the "
                f"folder that holds them with --data-dir (or IWAE_DATA_DIR)"
            )
        files = {name: sha256((folder / name).read_bytes()) for name in cls.files}
        try:
            splits = [torch.as_tensor(np.asarray(split, dtype=np.float32)) for split in cls.read(folder)]
        except Exception as error:  # the reader is the researcher's code: anything
            message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            raise DataError(
                f"dataset {cls.name}: reading its files in {folder} failed ({message}); check the files and "
                f"{cls.__qualname__}.read"
            ) from None
        _check_splits(cls, splits)
        train, valid, test = splits
        if cls.binary:
            device = torch.device(device)
            return Dataset(cls.name, train.to(device), valid.to(device), test.to(device), FIXED, files)
        return grey_splits(cls.name, train, valid, test, binarization, device, files)


def _check_splits(cls: type[DatasetSource], splits: list[torch.Tensor]) -> None:
    if len(splits) != 3:
        raise DataError(f"dataset {cls.name}: {cls.__qualname__}.read returned {len(splits)} arrays, not 3")
    pixels = cls.shape[0] * cls.shape[1]
    for split, expected, array in zip(("train", "valid", "test"), cls.splits, splits):
        where = f"dataset {cls.name}: its {split} split"
        if array.shape != (expected, pixels):
            raise DataError(
                f"{where} has shape {tuple(array.shape)}; {cls.__qualname__} declares {expected} images of "
                f"{pixels} pixels (splits = {cls.splits}, shape = {cls.shape}): fix the files or the declaration"
            )
        if not torch.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise DataError(f"{where} has values outside [0, 1]: give grey levels in [0, 1] (or bits)")
        if cls.binary and not ((array == 0) | (array == 1)).all():
            raise DataError(f"{where} has values other than 0 and 1, but {cls.__qualname__} declares binary = True")


class DatasetDefinitionError(IWAEError, TypeError):
    """A dataset class that cannot be registered: the message names the class and the fix."""


def _register_dataset(cls: type[DatasetSource]) -> None:
    def fail(message: str) -> DatasetDefinitionError:
        return DatasetDefinitionError(f"dataset class {cls.__qualname__} (name {cls.name!r}): {message}")

    if not isinstance(cls.name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", cls.name):
        raise fail("the name must be lower-case letters, digits and '_', starting with a letter")
    if cls.name in DATASETS:
        raise fail(f"the name is taken by {DATASETS[cls.name].__module__}.{DATASETS[cls.name].__qualname__}")
    if not isinstance(getattr(cls, "title", None), str):
        raise fail("give it a title: the heading of its table in the query")
    splits = getattr(cls, "splits", None)
    if not (isinstance(splits, tuple) and len(splits) == 3 and all(isinstance(n, int) and n > 0 for n in splits)):
        raise fail(f"splits={splits!r}: give (training, validation, test) image counts, three positive integers")
    if not (len(cls.shape) == 2 and all(isinstance(n, int) and n > 0 for n in cls.shape)):
        raise fail(f"shape={cls.shape!r}: give an image's (height, width), two positive integers")
    if cls.read.__func__ is DatasetSource.read.__func__ and cls.loader is None:
        raise fail("it has no read(folder): define it, returning (train, valid, test) arrays [N, D]")
    if not isinstance(cls.files, tuple) or not all(isinstance(name, str) and name for name in cls.files):
        raise fail("files must be a tuple of file names in the data folder")
    needed = {"paper", "objective", "layers", "m", "k", "nll"}
    for entry in cls.published:
        if not isinstance(entry, dict) or not needed <= set(entry):
            raise fail(f"published entry {entry!r}: each needs {sorted(needed)}")
    DATASETS[cls.name] = cls


class MNIST(DatasetSource):
    name = "mnist"
    title = "MNIST, dynamically binarized (Burda et al. Table 1)"
    splits = (59_600, N_VALIDATION, 10_000)
    files = tuple(MNIST_SHA256)
    mirrors_variable = MIRRORS_VARIABLE
    loader = staticmethod(load_mnist)
