"""Nothing lost on a crash while writing: a process SIGKILLed with a new version of a file fully
written under its temp name, just before the rename, leaves the previous version intact and
loadable (and the next run carries on from it)."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from conftest import small_mnist
from pyarrow import fs as pafs

from iwae_model import TrainConfig
from iwae_model.checkpoint import load_checkpoint
from iwae_model.files import umask
from iwae_model.training import train
from sweep.columns import RESULTS
from sweep.folder import read_spec
from sweep.results import read_results
from sweep.space import parse_space
from sweep.storage import filesystem_and_path
from sweep.trust import check_state_signed, signed_storage

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
    run_killed(
        KILLING_FILESYSTEM
        + f"""
from pyarrow import fs as pafs
from sweep.columns import RESULTS
from sweep.results import write_results
row = dict.fromkeys(RESULTS.arrow().names)
write_results([{{**row, "trial_name": "before"}}], {path!r}, pafs.LocalFileSystem())
write_results([{{**row, "trial_name": "after"}}], {path!r}, killing)
"""
    )
    assert read_results(path).column("trial_name").to_pylist() == ["before"]
    (unrenamed,) = (tmp_path / "results").glob(".tmp-*.parquet")
    table = pq.read_table(unrenamed)
    assert table.schema.equals(RESULTS.arrow()) and table.column("trial_name").to_pylist() == ["after"]


def test_killed_while_writing_the_sweep_spec(tmp_path):
    space = parse_space({"name": "spec", "experiments": [{"objective": "iwae", "k": [1, 5]}]}, "<test>")
    run_killed(
        KILLING_FILESYSTEM
        + f"""
from pyarrow import fs as pafs
from sweep.folder import write_spec
from sweep.space import parse_space
space = parse_space({{"name": "spec", "experiments": [{{"objective": "iwae", "k": [1, 5]}}]}}, "<test>")
write_spec({str(tmp_path)!r}, pafs.LocalFileSystem(), space, "/data/before")
write_spec({str(tmp_path)!r}, killing, space, "/data/after")
"""
    )
    assert read_spec(str(tmp_path), pafs.LocalFileSystem()) == (space, "/data/before")
    assert len(list(tmp_path.glob(".tmp-*-iwae_sweep.json"))) == 1


def test_killed_while_ray_tune_rewrites_its_state_in_a_sweep_folder(tmp_path):
    # Ray Tune rewrites its state files in place through the sweep's filesystem; a driver killed
    # mid-write used to leave a truncated one, and Tune then restarted the sweep from nothing.
    path = str(tmp_path / "experiment_state-x.json")
    run_killed(f"""
import os, signal
from sweep.storage import filesystem_and_path
from sweep.trust import check_state_signed, signed_storage
filesystem, _ = filesystem_and_path({str(tmp_path)!r})
with filesystem.open_output_stream({path!r}) as out:
    out.write(b'{{"before": 1}}')
out = filesystem.open_output_stream({path!r})
out.write(b'{{"after": ')
out.flush()
os.kill(os.getpid(), signal.SIGKILL)
""")
    assert json.loads(Path(path).read_text()) == {"before": 1}
    (partial,) = tmp_path.glob(".experiment_state-x.json.*.partial")
    assert partial.read_bytes() == b'{"after": '


def test_a_state_file_copied_while_ray_tune_rewrites_it_leaves_the_previous_one(tmp_path):
    # Ray Tune rewrites its staging copy in place while an earlier upload may still be copying
    # it: the upload can read it empty or cut short. That copy must not replace the whole state.
    filesystem = signed_storage(filesystem_and_path(str(tmp_path))[0])
    path = str(tmp_path / "experiment_state-x.json")
    for data in (b'{"before": 1}', b"", b'{"after": '):
        with filesystem.open_output_stream(path) as out:
            out.write(data)
    assert json.loads(Path(path).read_text()) == {"before": 1}
    check_state_signed(str(tmp_path), filesystem_and_path(str(tmp_path))[0])  # still its signature's


def test_the_sweep_filesystem_copies_folders_as_ray_uploads_them_and_travels_to_workers(tmp_path):
    source = tmp_path / "staging"
    (source / "checkpoint_000000").mkdir(parents=True)
    (source / "checkpoint_000000" / "checkpoint.pt").write_bytes(bytes(range(256)) * 4096)
    (source / "experiment_state-x.json").write_text('{"trial_data": []}')
    filesystem, folder = filesystem_and_path(str(tmp_path / "storage"))
    filesystem = pickle.loads(pickle.dumps(filesystem))  # as Ray hands it to a trial's worker
    pafs.copy_files(
        str(source), f"{folder}/sweep", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem
    )
    copied = tmp_path / "storage" / "sweep"
    assert sorted(p.relative_to(copied).as_posix() for p in copied.rglob("*")) == [
        "checkpoint_000000",
        "checkpoint_000000/checkpoint.pt",
        "experiment_state-x.json",
    ]
    assert (copied / "checkpoint_000000" / "checkpoint.pt").read_bytes() == bytes(range(256)) * 4096
    assert oct((copied / "experiment_state-x.json").stat().st_mode & 0o777) == oct(0o666 & ~umask())
