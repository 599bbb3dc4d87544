from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from iwae_model.checkpoint import load_checkpoint
from iwae_model.data import Dataset, load_mnist

try:
    import ray

    from sweep.cluster import keep_local_ray_on_loopback
    from sweep.local_cluster import session_processes
    from sweep.results import read_results
    from sweep.run import main as run_main
    from sweep.space import SweepSpace, parse_space
    from sweep.trials import NODES_FILE
except ModuleNotFoundError as missing:  # a GPU host with torch and no Ray: the model-level checks still run
    if missing.name != "ray":
        raise
else:
    # Every Ray process the tests start (in this process or in the CLIs they run, which inherit the
    # environment) stays on 127.0.0.1, never the machine's external address: the product's own
    # switch, checked by test_ray_stays_on_loopback and test_a_local_sweep_ray_is_on_loopback.
    keep_local_ray_on_loopback()


if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 0)):
    # pytest-xdist's workers share the machine's cores: torch in each takes its share, not all.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

# The files whose tests take longest (the --durations of a full run), handed out first: with
# `--dist loadfile` a worker takes a whole file, and a long one started last would run alone at
# the end while the other workers sit idle.
LONGEST_FIRST = (
    "test_sweep_interrupted.py",
    "test_search.py",
    "test_cluster.py",
    "test_sweep.py",
    "test_killed_driver.py",
    "test_hostile_folder.py",
    "test_trackers.py",
    "test_plugins.py",
    "test_datasets.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order


@pytest.fixture(scope="session", autouse=True)
def signing_key(tmp_path_factory) -> Path:
    """The sweeps' signing key (sweep.trust) in the session's temp folder, not the user's home;
    the CLIs the tests start inherit it."""
    key = tmp_path_factory.mktemp("config") / "state.key"
    os.environ["IWAE_SWEEP_KEY_FILE"] = str(key)
    return key


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


def tiny_space(name: str, **changes) -> SweepSpace:
    return parse_space({**TINY_SPACE, "name": name, **changes}, f"<{name}>")


def trial_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.startswith(("vae_", "iwae_")))


def assert_complete_history(checkpoint_dir: Path, passes: int = TINY_PASSES):
    """The scientific record in a trial's last checkpoint: every pass exactly once."""
    state = load_checkpoint(checkpoint_dir)
    assert [row["epoch"] for row in state["history"]] == list(range(1, passes + 1))
    lines = (checkpoint_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, passes + 1))


def assert_same_evaluations(again: list[dict], before: list[dict]):
    """The same checkpoints evaluated with the same seed: the same estimates up to float32
    rounding (actors with another thread count split the GEMMs differently)."""
    key = "checkpoint_uri"
    assert sorted(r[key] for r in again) == sorted(r[key] for r in before)
    by_uri = {r[key]: r for r in before}
    for row in again:
        assert row["test_nll"] == pytest.approx(by_uri[row[key]]["test_nll"], rel=FLOAT32_REORDER_RTOL)


def wait_for_checkpoint(
    driver: subprocess.Popen, sweep_dir: Path, name: str, seconds: float = 240, log: Path | None = None
) -> None:
    """Until some trial of the running sweep has written checkpoint `name`, every file of it (polled:
    the files are all there is to wait on; Ray copies them into place one by one). `log`: the
    driver's output, shown if it ends first."""
    deadline = time.monotonic() + seconds
    while not list(sweep_dir.glob(f"*/{name}/{NODES_FILE}")) or not list(sweep_dir.glob(f"*/{name}/checkpoint.pt")):
        assert driver.poll() is None, "the sweep ended before it could be stopped" + (
            f":\n{log.read_text()[-3000:]}" if log else ""
        )
        assert time.monotonic() < deadline, f"no {name} within {seconds} s"
        time.sleep(0.2)


def sweep_cli(space: dict, folder: Path, mnist_dir: Path, *options: str) -> list[str]:
    """The `python -m sweep.run` command a user types for `space` (written to folder/space.yaml),
    storing the sweep under folder/store."""
    (folder / "space.yaml").write_text(yaml.safe_dump(space))
    run = [sys.executable, "-m", "sweep.run", "--space", str(folder / "space.yaml"), "--storage", str(folder / "store")]
    return [*run, "--data-dir", str(mnist_dir), *options]


def kill_driver(driver: subprocess.Popen) -> None:
    """SIGKILL a driver started with `start_new_session=True` and every process of its session
    (the local Ray it started: Ray's workers are in other process groups), and wait until they are
    gone, so that nothing writes into the sweep folder afterwards."""
    try:
        os.killpg(driver.pid, signal.SIGKILL)
    except ProcessLookupError:  # it had ended by itself: its Ray may still be stopping
        pass
    driver.wait()
    deadline = time.monotonic() + 60
    while left := session_processes(driver.pid):
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert time.monotonic() < deadline, f"processes of the killed driver's session still alive: {left}"
        time.sleep(0.1)


def kill_sweep_at_first_checkpoint(space: dict, tmp_path: Path, mnist_dir: Path, stage: str) -> tuple[list[str], Path]:
    """Start `python -m sweep.run` on `space` and SIGKILL it (and the local Ray it started) once a
    trial in `<sweep>/<stage>` has written its second checkpoint, or a later one (with `keep: 1`
    each lasts a pass); return the command and the sweep folder."""
    command = sweep_cli(space, tmp_path, mnist_dir)
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    sweep_dir = tmp_path / "store" / space["name"]
    try:
        wait_for_checkpoint(driver, sweep_dir / stage, "checkpoint_00000[1-9]")
    finally:
        kill_driver(driver)
    return command, sweep_dir


def resume_in_process(command: list[str], capfd) -> tuple[str, str]:
    """`command --resume` (a `python -m sweep.run` command line) in this process, on the Ray it has
    started (`local_ray`, or a test's own): the resume reads the sweep's files alone, as a new
    driver's does, without the seconds of CPU a second Ray's start costs. Returns what it printed
    (stdout, stderr)."""
    assert ray.is_initialized(), "start this process's Ray first: the resume would start one and leave it"
    capfd.readouterr()
    run_main([*command[3:], "--resume"])
    return capfd.readouterr()


@pytest.fixture(scope="module")
def s3_storage():
    """A real S3 API (moto's server) on 127.0.0.1; the credentials travel in the URI, so Ray's
    workers need no environment. Call it with a path in the bucket to get its URI."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1&allow_bucket_creation=true"
    yield lambda path: f"s3://testing:testing@iwae-bucket/{path}?{query}"
    server.stop()


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for a module's in-process sweeps (a start and a stop cost seconds each)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@dataclasses.dataclass(frozen=True)
class FinishedSweep:
    folder: Path  # <storage>/tiny
    results: Path  # its results.parquet
    rows: list[dict]  # the evaluated rows as the sweep wrote them
    out: str  # what the driver printed, to a pipe as in a log file
    err: str


@pytest.fixture(scope="session")
def tiny_sweep(mnist_dir, tmp_path_factory) -> FinishedSweep:
    """TINY_SPACE run once as a user runs it, `python -m sweep.run` with its output to a pipe: the
    tests that read a finished sweep's files, and the live view's log-file form, share it."""
    where = tmp_path_factory.mktemp("tiny")
    command = sweep_cli({**TINY_SPACE, "name": "tiny"}, where, mnist_dir)
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    printed = re.search(r"^Results: (\S+) \((\d+) rows\)$", done.stdout, re.MULTILINE)  # what the driver wrote
    assert printed, done.stdout[-3000:]
    folder = where / "store" / "tiny"
    rows = read_results(str(folder)).to_pylist()
    assert len(rows) == int(printed[2]), printed[0]
    return FinishedSweep(folder, Path(printed[1]), rows, done.stdout, done.stderr)
