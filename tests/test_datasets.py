"""Omniglot and Larochelle & Murray's binarized MNIST, from small or full-size files of the real
formats (the real files cannot be downloaded here), checked against an independent few-line
reimplementation of the authors' `datasets.py`."""

import functools
import hashlib
import json
import shutil
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import scipy.io
import torch
from test_data import QuietHandler

from iwae_model import TrainConfig
from iwae_model.binarized_mnist import ROWS, load_binarized_mnist, read_amat
from iwae_model.data import DataError, binarize_once
from iwae_model.datasets import load_dataset
from iwae_model.omniglot import GIT_BLOB_VARIABLE, git_blob_id, load_omniglot
from iwae_model.training import train
from sweep.run import run_sweep
from sweep.space import parse_space

OMNIGLOT_TRAIN, OMNIGLOT_TEST = 1400, 60  # the authors' file: 24,345 and 8,070
TINY_TRAINING = {"passes": 2, "train_images": 200, "test_images": 40, "latent_dims": [4], "hidden_dims": [16]}


def write_chardata(path, seed=0):
    """A chardata.mat with the authors' keys, [784, N] layout and grey levels in [0, 1]."""
    rng = np.random.default_rng(seed)
    scipy.io.savemat(
        path,
        {
            "data": rng.random((784, OMNIGLOT_TRAIN)),
            "testdata": rng.random((784, OMNIGLOT_TEST)),
            "target": np.zeros((50, OMNIGLOT_TRAIN)),
            "testtarget": np.zeros((50, OMNIGLOT_TEST)),
        },
    )


def write_amat(path, rows, seed):
    """`rows` lines of 784 space-separated 0/1 values, as in Larochelle & Murray's files."""
    bits = np.random.default_rng(seed).integers(0, 2, (rows, 784), dtype=np.uint8)
    text = np.full((rows, 2 * 784), ord(" "), dtype=np.uint8)
    text[:, 0::2] = bits + ord("0")
    text[:, -1] = ord("\n")
    path.write_bytes(text.tobytes())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, mnist_dir):
    """One folder with all three datasets: the real MNIST files, a synthetic chardata.mat and
    full-size synthetic .amat files."""
    folder = tmp_path_factory.mktemp("data")
    for mnist_file in mnist_dir.glob("*-ubyte.gz"):
        shutil.copy(mnist_file, folder)
    write_chardata(folder / "chardata.mat")
    for seed, (name, rows) in enumerate(ROWS.items()):
        write_amat(folder / name, rows, seed)
    return folder


@pytest.fixture
def accept_synthetic_omniglot(data_dir, monkeypatch):
    monkeypatch.setenv(GIT_BLOB_VARIABLE, git_blob_id((data_dir / "chardata.mat").read_bytes()))


def test_the_git_blob_id_is_git_s(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(bytes(range(256)) * 10)
    git = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True).stdout.strip()
    assert git_blob_id(path.read_bytes()) == git


def test_omniglot_rows_order_permutation_and_split_are_the_authors(data_dir, accept_synthetic_omniglot):
    data = load_omniglot(data_dir, download=False)
    # The authors' transformations, written again: rows from the [784, N] arrays, each image
    # transposed (a Fortran-order reshape of 28x28), training rows permuted by RandomState(123),
    # the last 1,345 for validation.
    mat = scipy.io.loadmat(data_dir / "chardata.mat")
    train_all, test = (
        mat[key].T.reshape(-1, 28, 28).transpose(0, 2, 1).reshape(-1, 784).astype("float32")
        for key in ("data", "testdata")
    )
    train_all = train_all[np.random.RandomState(123).permutation(OMNIGLOT_TRAIN)]
    assert torch.equal(data.train, torch.from_numpy(train_all[:-1345]))
    assert torch.equal(data.valid, torch.from_numpy(train_all[-1345:]))
    assert torch.equal(data.test, torch.from_numpy(test))
    assert data.name == "omniglot" and data.binarization == "dynamic"
    # Binarized as MNIST: a fresh draw per batch, the test set once with seed 123.
    generator = torch.Generator().manual_seed(0)
    first, second = data.training_batch(data.train, generator), data.training_batch(data.train, generator)
    assert not torch.equal(first, second) and set(first.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(data.binarized_once("test"), binarize_once(data.test, 123))
    assert data.files == {"chardata.mat": hashlib.sha256((data_dir / "chardata.mat").read_bytes()).hexdigest()}


def test_omniglot_verification_names_the_file_and_the_fix(data_dir, tmp_path, monkeypatch):
    copy = tmp_path / "chardata.mat"
    shutil.copy(data_dir / "chardata.mat", copy)
    with pytest.raises(DataError, match=rf"(?s){copy}: git blob id [0-9a-f]{{40}}, expected 016a3536.*delete it"):
        load_omniglot(tmp_path, download=False)  # not the authors' bytes
    monkeypatch.setenv(GIT_BLOB_VARIABLE, git_blob_id(copy.read_bytes()))
    assert load_omniglot(tmp_path, download=False).test.shape == (OMNIGLOT_TEST, 784)  # the expected bytes pass
    raw = bytearray(copy.read_bytes())
    raw[-1] ^= 1
    copy.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"{copy}: git blob id"):
        load_omniglot(tmp_path, download=False)


def test_a_mat_file_of_another_shape_is_named(tmp_path, monkeypatch):
    path = tmp_path / "chardata.mat"
    scipy.io.savemat(path, {"data": np.zeros((100, 2000)), "testdata": np.zeros((100, 10))})
    monkeypatch.setenv(GIT_BLOB_VARIABLE, git_blob_id(path.read_bytes()))
    with pytest.raises(DataError, match=r"'data' has shape \(100, 2000\).*784 rows"):
        load_omniglot(tmp_path, download=False)
    with pytest.raises(DataError, match="Put the IWAE authors' chardata.mat"):
        load_omniglot(tmp_path / "empty", download=False)


def test_binarized_mnist_split_is_the_authors_and_nothing_is_binarized(data_dir):
    data = load_binarized_mnist(data_dir, download=False)
    # The authors': train and valid files concatenated, the last 10,000 rows for validation.
    train, valid, test = (np.loadtxt(data_dir / name, dtype=np.float32) for name in ROWS)
    train_all = np.concatenate([train, valid])
    assert torch.equal(data.train, torch.from_numpy(train_all[:-10000]))
    assert torch.equal(data.valid, torch.from_numpy(train_all[-10000:]))
    assert torch.equal(data.test, torch.from_numpy(test))
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(data.training_batch(data.train[:100], generator), data.train[:100])
    assert torch.equal(data.binarized_once("test"), data.test) and torch.equal(data.binarized_once("valid"), data.valid)
    assert data.files == {name: hashlib.sha256((data_dir / name).read_bytes()).hexdigest() for name in ROWS}
    assert data.binarization == "fixed" and data.as_in_papers


GOOD_LINE = b" ".join([b"0", b"1"] * 392) + b"\n"


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda good: good[: -len(GOOD_LINE)], "it has 2 lines"),
        (lambda good: good.replace(b"1", b"2", 1), "byte 2 is b'2'"),
        (lambda good: good.replace(b"1", b"10", 1), "it has a value of several digits"),
        (lambda good: good.replace(b" 1\n", b"\n", 1), "line 1 has 783 values"),
        (lambda good: good.replace(b"1", b"0.0", 1), "byte 3 is b'.'"),
    ],
)
def test_an_amat_file_of_another_structure_is_named(damage, words):
    good = GOOD_LINE * 3
    assert read_amat(good, "good.amat", 3).shape == (3, 784)
    with pytest.raises(DataError, match=rf"(?s)my.amat: {words}.*3 lines of 784 values.*delete it"):
        read_amat(damage(good), "my.amat", 3)


def test_an_amat_file_of_784_columns_reads(tmp_path):
    write_amat(tmp_path / "small.amat", 3, seed=7)
    raw = (tmp_path / "small.amat").read_bytes()
    assert np.array_equal(read_amat(raw, "small.amat", 3), np.loadtxt(tmp_path / "small.amat", dtype=np.float32))
    assert np.array_equal(read_amat(raw.replace(b"\n", b"\r\n"), "crlf.amat", 3), read_amat(raw, "lf.amat", 3))


@pytest.mark.parametrize("dataset", ["omniglot", "binarized_mnist"])
def test_a_short_training_run_and_a_k5000_evaluation_on_each_dataset(
    data_dir, accept_synthetic_omniglot, tmp_path, dataset
):
    config = TrainConfig(dataset=dataset, **TINY_TRAINING)
    history = train(config, tmp_path / "run", data_dir=data_dir, progress=False)
    assert len(history) == 2 and all(np.isfinite(row["valid_bound"]) for row in history)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "iwae_model.evaluate",
            str(tmp_path / "run"),
            "--k",
            "5000",
            "--images",
            "8",
            "--data-dir",
            str(data_dir),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["dataset"] == dataset and result["k"] == 5000 and result["images"] == 8
    assert np.isfinite(result["nll"]) and result["nll"] > 0
    assert set(result["data_files"]) == {"omniglot": {"chardata.mat"}, "binarized_mnist": set(ROWS)}[dataset]


def test_binarized_mnist_takes_only_its_own_binarization():
    with pytest.raises(ValueError, match="binarization='static': binarized_mnist is binary already"):
        TrainConfig(dataset="binarized_mnist", binarization="static")
    with pytest.raises(ValueError, match="dataset='cifar'"):
        TrainConfig(dataset="cifar")
    with pytest.raises(ValueError, match="dataset='cifar'"):
        load_dataset("cifar")
    assert TrainConfig(dataset="omniglot").label() == "omniglot_iwae_L1_M1_K5_s0"


def test_a_sweep_with_a_dataset_axis_has_rows_and_a_table_per_dataset(data_dir, tmp_path):
    space = parse_space(
        {
            "name": "datasets",
            "experiments": [{"objective": "iwae", "k": 2, "dataset": ["mnist", "binarized_mnist"]}],
            "training": TINY_TRAINING,
            "evaluation": {"k": 50, "images": 20},
            "checkpoints": {"keep": 1, "every": 1},
        },
        "<datasets>",
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        path, _, failed = run_sweep(space, str(tmp_path), str(data_dir))
    finally:
        ray.shutdown()
    assert not failed
    table = pq.read_table(path).to_pylist()
    assert sorted((r["dataset"], r["binarization"], r["trial_name"]) for r in table) == [
        ("binarized_mnist", "fixed", "binarized_mnist_iwae_L1_M1_K2_s0"),
        ("mnist", "dynamic", "iwae_L1_M1_K2_s0"),
    ]
    files = {r["dataset"]: json.loads(r["data_files"]) for r in table}
    assert files["binarized_mnist"] == {
        name: hashlib.sha256((data_dir / name).read_bytes()).hexdigest() for name in ROWS
    }
    assert set(files["mnist"]) == {
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    }
    query = subprocess.run(
        [sys.executable, "-m", "sweep.query", str(tmp_path / "datasets")], capture_output=True, text=True, timeout=300
    )
    assert query.returncode == 0, query.stderr[-3000:]
    mnist_at = query.stdout.index("MNIST, dynamically binarized (Burda et al. Table 1):")
    fixed_at = query.stdout.index("MNIST, Larochelle & Murray's fixed binarization (Burda et al. Appendix D):")
    assert mnist_at < fixed_at and query.stdout.count("| layers | M | K | IWAE |") == 2


def test_omniglot_downloads_from_the_first_mirror_with_the_right_bytes(data_dir, tmp_path, monkeypatch):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(), bad.mkdir()
    shutil.copy(data_dir / "chardata.mat", good / "chardata.mat")
    (bad / "chardata.mat").write_bytes((data_dir / "chardata.mat").read_bytes()[:-10])  # truncated
    servers = []
    for folder in (bad, good):
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    try:
        monkeypatch.setenv(GIT_BLOB_VARIABLE, git_blob_id((good / "chardata.mat").read_bytes()))
        monkeypatch.setenv(
            "IWAE_OMNIGLOT_MIRRORS", ",".join(f"http://127.0.0.1:{s.server_address[1]}/" for s in servers)
        )
        data = load_omniglot(tmp_path / "cache")
        assert data.test.shape == (OMNIGLOT_TEST, 784)
        assert [p.name for p in (tmp_path / "cache").iterdir()] == ["chardata.mat"]  # verified, whole, no temp file
        assert (tmp_path / "cache" / "chardata.mat").read_bytes() == (good / "chardata.mat").read_bytes()
        monkeypatch.setenv("IWAE_OMNIGLOT_MIRRORS", f"http://127.0.0.1:{servers[0].server_address[1]}/")
        with pytest.raises(
            DataError,
            match=r"(?s)could not be downloaded:\n  http://127\.0\.0\.1:\d+/chardata\.mat: "
            r".*git blob id.*Put the IWAE authors' chardata\.mat",
        ):
            load_omniglot(tmp_path / "other")
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
