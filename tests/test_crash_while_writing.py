"""Nothing lost on a crash while writing: a process SIGKILLed with a new version of a file fully
written under its temp name, just before the rename, leaves the previous version intact and
loadable (and the next run carries on from it)."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from conftest import small_mnist
from pyarrow import fs as pafs

from iwae_model import TrainConfig
from iwae_model.checkpoint import load_checkpoint
from iwae_model.training import train
from sweep.folder import read_spec
from sweep.results import SCHEMA, read_results
from sweep.space import parse_space

TESTS = Path(__file__).parent
TINY = dict(train_images=200, test_images=100, passes=2, k=2, latent_dims=(4,), hidden_dims=(16,))

# Runs in the child before its script: the N-th os.replace onto a file named NAME kills the
# process instead, as a power cut or OOM kill would, right between the write and the rename.
KILL_AT_REPLACE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
real_replace, seen = os.replace, []
def replace(src, dst, *args, **kwargs):
    if os.path.basename(dst) == {name!r}:
        seen.append(dst)
        if len(seen) == {nth}:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
"""

# The same for writes through a pyarrow filesystem (Parquet, the sweep spec; S3 in production):
# a local filesystem whose move SIGKILLs the process.
KILLING_FILESYSTEM = """
import os, signal
from fsspec.implementations.local import LocalFileSystem
from pyarrow import fs as pafs
class KillOnMove(LocalFileSystem):
    def mv(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
killing = pafs.PyFileSystem(pafs.FSSpecHandler(KillOnMove()))
"""


def run_killed(script: str) -> None:
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]


def train_script(run_dir: Path, mnist_dir: Path) -> str:
    return f"""
from conftest import small_mnist
from iwae_model import TrainConfig, load_mnist
from iwae_model.training import train
train(TrainConfig(**{TINY!r}), {str(run_dir)!r}, small_mnist(load_mnist({str(mnist_dir)!r})), progress=False)
"""


def test_killed_while_writing_the_checkpoint(mnist, mnist_dir, tmp_path):
    kill = KILL_AT_REPLACE.format(tests=str(TESTS), name="checkpoint.pt", nth=2)
    run_killed(kill + train_script(tmp_path, mnist_dir))
    assert load_checkpoint(tmp_path)["epoch"] == 1  # the previous version, whole
    (unrenamed,) = tmp_path.glob(".checkpoint.pt.*")
    assert load_checkpoint(unrenamed)["epoch"] == 2  # killed with the new one written, before the rename
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    history = train(TrainConfig(**TINY), tmp_path, small_mnist(mnist), progress=False)
    assert [row["epoch"] for row in history] == [1, 2]


def test_killed_while_writing_metrics_jsonl(mnist, mnist_dir, tmp_path):
    kill = KILL_AT_REPLACE.format(tests=str(TESTS), name="metrics.jsonl", nth=2)
    run_killed(kill + train_script(tmp_path, mnist_dir))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1]  # the previous version, whole
    (unrenamed,) = tmp_path.glob(".metrics.jsonl.*")
    assert len(unrenamed.read_text().splitlines()) == 2
    assert load_checkpoint(tmp_path)["epoch"] == 2  # renamed just before
    train(TrainConfig(**TINY), tmp_path, small_mnist(mnist), progress=False)  # rewrites it from the checkpoint
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_killed_while_writing_results_parquet(tmp_path):
    path = str(tmp_path / "results" / "results.parquet")
    run_killed(KILLING_FILESYSTEM + f"""
from pyarrow import fs as pafs
from sweep.results import SCHEMA, write_results
row = dict.fromkeys(SCHEMA.names)
write_results([{{**row, "trial_name": "before"}}], {path!r}, pafs.LocalFileSystem())
write_results([{{**row, "trial_name": "after"}}], {path!r}, killing)
""")
    assert read_results(path).column("trial_name").to_pylist() == ["before"]
    (unrenamed,) = (tmp_path / "results").glob(".tmp-*.parquet")
    table = pq.read_table(unrenamed)
    assert table.schema.equals(SCHEMA) and table.column("trial_name").to_pylist() == ["after"]


def test_killed_while_writing_the_sweep_spec(tmp_path):
    space = parse_space({"name": "spec", "experiments": [{"objective": "iwae", "k": [1, 5]}]}, "<test>")
    run_killed(KILLING_FILESYSTEM + f"""
from pyarrow import fs as pafs
from sweep.folder import write_spec
from sweep.space import parse_space
space = parse_space({{"name": "spec", "experiments": [{{"objective": "iwae", "k": [1, 5]}}]}}, "<test>")
write_spec({str(tmp_path)!r}, pafs.LocalFileSystem(), space, "/data/before")
write_spec({str(tmp_path)!r}, killing, space, "/data/after")
""")
    assert read_spec(str(tmp_path), pafs.LocalFileSystem()) == (space, "/data/before")
    assert len(list(tmp_path.glob(".tmp-*-iwae_sweep.json"))) == 1
