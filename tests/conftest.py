import dataclasses
import os
from pathlib import Path

import pytest
import torch

from iwae_model.data import Dataset, load_mnist

try:
    from sweep.cluster import keep_local_ray_on_loopback
except ModuleNotFoundError as missing:  # a GPU host with torch and no Ray: the model-level checks still run
    if missing.name != "ray":
        raise
else:
    # Every Ray process the tests start (in this process or in the CLIs they run, which inherit the
    # environment) stays on 127.0.0.1, never the machine's external address: the product's own
    # switch, checked by test_ray_stays_on_loopback and test_a_local_sweep_ray_is_on_loopback.
    keep_local_ray_on_loopback()


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST files. CI sets IWAE_DATA_DIR; without it these tests cannot run, and in
    CI that is a failure, not a skip."""
    folder = os.environ.get("IWAE_DATA_DIR")
    if not folder or not Path(folder).is_dir():
        if os.environ.get("CI"):
            pytest.fail("IWAE_DATA_DIR must point at the MNIST folder in CI")
        pytest.skip("IWAE_DATA_DIR is not set: real-MNIST tests need it")
    return Path(folder)


@pytest.fixture(scope="session")
def mnist(mnist_dir) -> Dataset:
    return load_mnist(mnist_dir, download=False)


def small_mnist(mnist: Dataset, train: int = 200, test: int = 100) -> Dataset:
    """The first images of each split, real pixels, for fast runs."""
    return dataclasses.replace(
        mnist,
        train=mnist.train[:train],
        test=mnist.test[:test],
        train_labels=mnist.train_labels[:train],
        test_labels=mnist.test_labels[:test],
    )


class Crash(Exception):
    """Raised by a training callback: the run stops as a crash would, its checkpoint on disk."""


def crash_after_first_pass(run) -> None:
    if run.epoch == 1:
        raise Crash


def random_binary(batch: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.bernoulli(torch.full((batch, dim), 0.3), generator=torch.Generator().manual_seed(seed))


# Equal up to float32 rounding. The same float32 sums computed in another order -- a GEMM over a
# different number of rows, or split over another number of threads, which MKL and OpenBLAS
# do differently on each CPU -- round differently. A log-weight is such a sum (~1,000 terms:
# 784 pixels plus the latents), and each ends within a few float32 ulps of its magnitude.
# log-sum-exp moves by at most the largest change of its inputs, so a k-sample estimate agrees
# to the same relative size. Allowed: 16 ulps, relative.
FLOAT32_REORDER_RTOL = 16 * torch.finfo(torch.float32).eps  # 1.9e-6: 1e-3 nats at log p(x) = -600


# The smallest sweep that exercises everything: two trials of three short passes on real MNIST.
TINY_PASSES = 3
TINY_SPACE = {
    "experiments": [{"objective": "vae", "k": 1}, {"objective": "iwae", "k": 3}],
    "training": {
        "passes": TINY_PASSES,
        "train_images": 400,
        "test_images": 100,
        "snr_every": TINY_PASSES,
        "snr_draws": 3,
        "snr_images": 20,
    },
    "evaluation": {"k": 50, "images": 40},
    "checkpoints": {"keep": 1, "every": 1},
}
