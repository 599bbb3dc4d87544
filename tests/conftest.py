import os
from pathlib import Path

import pytest
import torch

from iwae_model.data import MNIST, load_mnist


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
def mnist(mnist_dir) -> MNIST:
    return load_mnist(mnist_dir, download=False)


def small_mnist(mnist: MNIST, train: int = 200, test: int = 100) -> MNIST:
    """The first images of each split, real pixels, for fast runs."""
    return MNIST(mnist.train[:train], mnist.valid, mnist.test[:test],
                 mnist.train_labels[:train], mnist.test_labels[:test], mnist.binarization)


def random_binary(batch: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.bernoulli(torch.full((batch, dim), 0.3), generator=torch.Generator().manual_seed(seed))
