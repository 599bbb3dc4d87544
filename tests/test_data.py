import functools
import gzip
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from iwae_model.data import (
    MNIST_SHA256,
    DataError,
    binarize,
    default_data_dir,
    load_mnist,
    read_mnist_file,
)


def test_real_mnist_has_burdas_split_and_the_published_counts(mnist, mnist_dir):
    assert mnist.train.shape == (59600, 784) and mnist.valid.shape == (400, 784) and mnist.test.shape == (10000, 784)
    assert mnist.train.dtype == torch.float32 and 0 <= mnist.train.min() and mnist.train.max() <= 1
    # The validation images are the last 400 of the training file, in file order.
    all_train = torch.from_numpy(read_mnist_file("train-images-idx3-ubyte", mnist_dir, download=False).copy())
    assert torch.equal(mnist.valid, all_train[-400:].reshape(400, -1).float() / 255)
    all_labels = torch.from_numpy(read_mnist_file("train-labels-idx1-ubyte", mnist_dir, download=False).astype("int64"))
    assert torch.equal(mnist.train_labels, all_labels[:-400])
    assert torch.bincount(all_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(mnist.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    mean_255 = torch.cat([mnist.train, mnist.valid]).double().mean() * 255
    assert abs(mean_255.item() - 33.318) < 1e-3


def test_plain_and_gzipped_files_read_the_same(mnist_dir, tmp_path):
    name = "t10k-labels-idx1-ubyte"
    (tmp_path / name).write_bytes(gzip.decompress((mnist_dir / f"{name}.gz").read_bytes()))
    assert (read_mnist_file(name, tmp_path, download=False) == read_mnist_file(name, mnist_dir, download=False)).all()


@pytest.mark.parametrize("damage", ["truncated", "flipped", "not_gzip"])
def test_a_damaged_file_is_a_clear_error_naming_it(mnist_dir, tmp_path, damage):
    name = "t10k-labels-idx1-ubyte"
    raw = gzip.decompress((mnist_dir / f"{name}.gz").read_bytes())
    target = tmp_path / f"{name}.gz"
    if damage == "truncated":
        target.write_bytes(gzip.compress(raw[:-100]))
    elif damage == "flipped":
        target.write_bytes(gzip.compress(raw[:500] + bytes([raw[500] ^ 1]) + raw[501:]))
    else:
        target.write_bytes(raw[:1000])
    with pytest.raises(DataError, match=rf"(?s){target}.*(sha256|gzip).*(delete it|Delete it)"):
        read_mnist_file(name, tmp_path, download=False)


def test_missing_files_without_download_say_where_to_put_them(tmp_path):
    with pytest.raises(DataError, match=rf"(?s)not in {tmp_path}.*--data-dir / IWAE_DATA_DIR"):
        read_mnist_file("t10k-labels-idx1-ubyte", tmp_path, download=False)


def test_data_dir_order_argument_then_environment_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("IWAE_DATA_DIR", str(tmp_path / "env"))
    assert default_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert default_data_dir() == tmp_path / "env"
    monkeypatch.delenv("IWAE_DATA_DIR")
    assert default_data_dir() == Path.home() / ".cache" / "iwae-sweep" / "data"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory, mnist_dir):
    """Two real HTTP mirrors on 127.0.0.1: one serving corrupted copies, one the real files
    (recompressed, as real mirrors' .gz files differ from ours)."""
    root = tmp_path_factory.mktemp("mirrors")
    good, bad = root / "good", root / "bad"
    good.mkdir(), bad.mkdir()
    for name in MNIST_SHA256:
        raw = gzip.decompress((mnist_dir / f"{name}.gz").read_bytes())
        (good / f"{name}.gz").write_bytes(gzip.compress(raw, compresslevel=1))
        (bad / f"{name}.gz").write_bytes(gzip.compress(raw[:-1] + b"\x00", compresslevel=1))
    servers = []
    for folder in (good, bad):
        handler = functools.partial(QuietHandler, directory=str(folder))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    urls = [f"http://127.0.0.1:{s.server_address[1]}/" for s in servers]
    yield {"good": urls[0], "bad": urls[1]}
    for server in servers:
        server.shutdown()
        server.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_skips_a_corrupt_mirror_and_writes_verified_files(tmp_path, mirror):
    target = tmp_path / "cache"
    data = load_mnist(target, mirrors=(mirror["bad"], mirror["good"]))
    assert data.test.shape == (10000, 784)
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{n}.gz" for n in MNIST_SHA256)  # no temp files left
    # The written files are verified on the next read, with no network.
    assert (read_mnist_file("t10k-labels-idx1-ubyte", target, download=False) == data.test_labels.numpy()).all()


def test_only_corrupt_mirrors_is_an_error_listing_each_attempt(tmp_path, mirror):
    with pytest.raises(DataError, match=r"(?s)could not be downloaded:\n.*127\.0\.0\.1.*sha256"):
        read_mnist_file("t10k-labels-idx1-ubyte", tmp_path / "cache", mirrors=(mirror["bad"],))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_offline_fails_at_once_with_where_to_put_the_files(tmp_path):
    # Port 9 on loopback: nothing listens, the connection is refused immediately.
    with pytest.raises(DataError, match=r"(?s)could not be downloaded.*Put the four MNIST IDX files"):
        read_mnist_file("t10k-labels-idx1-ubyte", tmp_path, mirrors=("http://127.0.0.1:9/",), timeout=2)


def test_dynamic_binarization_is_bernoulli_of_the_grey_levels():
    grey = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0]).repeat(40000, 1)
    g = torch.Generator().manual_seed(0)
    first, second = binarize(grey, g), binarize(grey, g)
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(first, second)  # a fresh draw every time
    frequency = first.mean(0)
    assert frequency[0] == 0 and frequency[4] == 1
    assert torch.allclose(frequency[1:4], torch.tensor([0.2, 0.5, 0.9]), atol=0.01)


def test_test_set_binarization_is_fixed_and_device_independent(mnist):
    first, second = mnist.binarized_once("test"), mnist.binarized_once("test")
    assert torch.equal(first, second)
    assert abs(first.mean().item() - mnist.test.mean().item()) < 0.002


def test_static_binarization_is_labelled_and_fixed(mnist_dir):
    data = load_mnist(mnist_dir, binarization="static", download=False)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(data.training_batch(data.train[:20], g), data.train[:20])
    assert set(data.train[:100].unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="binarization='fixed'"):
        load_mnist(mnist_dir, binarization="fixed", download=False)


def test_the_mirrors_variable_replaces_the_public_mirrors(tmp_path, mirror, monkeypatch):
    monkeypatch.setenv("IWAE_MNIST_MIRRORS", f"{mirror['bad']},{mirror['good']}")
    assert load_mnist(tmp_path / "cache").test.shape == (10000, 784)
    monkeypatch.setenv("IWAE_MNIST_MIRRORS", mirror["bad"])
    with pytest.raises(DataError, match=r"(?s)could not be downloaded:\n  http://127\.0\.0\.1:\d+/t10k.*sha256"):
        read_mnist_file("t10k-labels-idx1-ubyte", tmp_path / "other")
