"""The cluster path on one machine: Ray's fake multi-node autoscaler (cluster.local.yaml, started by
`python -m sweep.local_cluster`) runs real raylets as nodes that advertise a GPU, scales them
from zero on demand and replaces lost ones. The sweep joins it with --address auto, as on AWS."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from conftest import TINY_SPACE, assert_complete_history, trial_dirs, wait_for_checkpoint
from ray._common.utils import get_ray_address_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from iwae_model import TrainConfig
from iwae_model.data import DataError
from sweep.cluster import init_ray, on_loopback
from sweep.local_cluster import ADDRESS, kill_node, process_table, read_state, session_processes
from sweep.results import read_results
from sweep.trainable import load_node_data
from sweep.trials import NODES_FILE

WORKER_ID_PREFIX = "f" * 51  # the fake provider numbers its nodes: ff...f00000 the head, then each worker it starts


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def cluster_up(env: dict | None = None) -> int:
    """The rehearsal cluster, as the README starts it; returns its process session."""
    started = cli("sweep.local_cluster", "up", env=env)
    assert started.returncode == 0, started.stderr[-3000:]
    return read_state()["session"]


def cluster_down(session: int) -> None:
    pids = session_processes(session)
    assert Path(get_ray_address_file(None)).read_text().strip() == ADDRESS  # what the head's `ray start` wrote
    stopped = cli("sweep.local_cluster", "down")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopped its" in stopped.stdout
    alive = [pid for pid in pids if pid in process_table()]  # zombies left out: they are only PID entries
    assert not alive and not session_processes(session), f"left behind: {alive}"
    # Nothing else left behind either: a plain ray.init() afterwards, as in the user's own notebook,
    # starts a Ray of its own instead of trying to join the stopped head.
    assert not Path(get_ray_address_file(None)).exists()
    fresh = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ray; ray.init(num_cpus=1, include_dashboard=False); "
            "print(ray._private.worker._global_node.head); ray.shutdown()",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert fresh.returncode == 0 and fresh.stdout.split()[-1] == "True", fresh.stderr[-3000:]


def space_file(tmp_path: Path, name: str, **training) -> Path:
    space = {**TINY_SPACE, "name": name, "training": {**TINY_SPACE["training"], **training}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def sweep_command(space: Path, storage: Path, mnist_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sweep.run",
        "--address",
        "auto",
        "--space",
        str(space),
        "--storage",
        str(storage),
        "--data-dir",
        str(mnist_dir),
        "--gpus-per-trial",
        "0.5",
        "--eval-gpus",
        "0.5",
        *extra,
    ]


def nodes_of(checkpoint: Path) -> list[dict]:
    return json.loads((checkpoint / NODES_FILE).read_text())


def alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node["Alive"]]


def head_node_id() -> str:
    return next(node["NodeID"] for node in ray.nodes() if "node:__internal_head__" in node["Resources"])


def epochs_in(checkpoint: Path) -> int:
    return len((checkpoint / "metrics.jsonl").read_text().splitlines())


def test_only_a_cluster_on_127_0_0_1_is_joined_over_loopback():
    # A real cluster's driver keeps Ray's normal addressing; the rehearsal's joins on loopback.
    assert on_loopback("127.0.0.1:6379") and on_loopback("localhost:6379")
    assert not on_loopback("10.0.3.17:6379") and not on_loopback("ray-head.internal:6379")


def test_rehearsal_scales_gpu_workers_from_zero_runs_the_sweep_on_them_and_goes_down_clean(mnist_dir, tmp_path):
    session = cluster_up()
    try:
        init_ray("auto")
        head = head_node_id()
        assert [node["NodeID"] for node in alive_nodes()] == [head]  # no worker before the sweep
        assert ray.cluster_resources().get("GPU", 0) == 0
        run = subprocess.run(
            sweep_command(space_file(tmp_path, "rehearsal"), tmp_path, mnist_dir),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert "Adding 1 node(s) of type gpu_worker" in run.stdout + run.stderr
        table = read_results(str(tmp_path / "rehearsal"))
        assert sorted(table.column("trial_name").to_pylist()) == ["iwae_L1_M1_K3_s0", "vae_L1_M1_K1_s0"]
        workers = set(table.column("train_node_id").to_pylist()) | set(table.column("eval_node_id").to_pylist())
        assert head not in workers and all(node.startswith(WORKER_ID_PREFIX) for node in workers)
        # Ray gave each trial a GPU its node advertises only (cluster.local.yaml's label): it trained
        # on CPU and says so; so did the evaluation, given half of one.
        for nodes in map(json.loads, table.column("train_nodes").to_pylist()):
            assert [
                (n["device"], n["ray_gpu_ids"], n["gpus_advertised_only"], n["first_epoch"], n["float32"])
                for n in nodes
            ] == [("cpu", ["0"], True, 1, "ieee")]
        assert set(table.column("train_device").to_pylist()) == {"cpu"} == set(table.column("device").to_pylist())
        for trial in trial_dirs(tmp_path / "rehearsal"):
            # What the driver ships to a worker per trial is its small configuration (the data
            # are read on the node): Tune keeps that pickle in the trial folder.
            assert (trial / "params.pkl").stat().st_size < 20_000
            # The node is in the trial's TensorBoard run too.
            events = EventAccumulator(str(trial), size_guidance={"tensors": 0}).Reload()
            text = events.Tensors("run/node/text_summary")[0].tensor_proto.string_val[0].decode()
            assert "device cpu" in text and "Ray node fffff" in text
        assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
        # Idle workers leave after cluster.local.yaml's 12 s (polled: the autoscaler's state is
        # all there is to wait on).
        deadline = time.monotonic() + 120
        while len(alive_nodes()) > 1:
            assert time.monotonic() < deadline, f"workers still up: {alive_nodes()}"
            time.sleep(1)
    finally:
        ray.shutdown()
        cluster_down(session)


# Failure detection in seconds instead of half a minute: the GCS declares a silent raylet dead
# after 3 missed 1 s health checks (Ray's default: 5 of 3 s), the autoscaler counts a node
# without heartbeat for 5 s as lost (default 30 s).
FAST_FAILURE = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_timeout_ms": "1000",
    "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "5",
}


@pytest.fixture(scope="module")
def cluster():
    session = cluster_up(FAST_FAILURE)
    init_ray("auto")
    yield session
    ray.shutdown()
    cluster_down(session)


PASSES_LOST = 6


def test_a_lost_node_s_trial_restarts_from_its_checkpoint_on_another_node(cluster, mnist_dir, tmp_path):
    # Four trials on at most two workers, each pass some seconds: the kill lands mid-pass, and
    # trials still wait for a node when the autoscaler gives up the lost one, so it starts another.
    space = space_file(tmp_path, "node_loss", passes=PASSES_LOST, train_images=6000)
    space.write_text(
        yaml.safe_dump(
            {
                **yaml.safe_load(space.read_text()),
                "experiments": [{"objective": "vae", "k": 1}, {"objective": "iwae", "k": [2, 3, 4]}],
            }
        )
    )
    with (tmp_path / "driver.log").open("w") as log:
        driver = subprocess.Popen(sweep_command(space, tmp_path, mnist_dir), stdout=log, stderr=subprocess.STDOUT)
        timeline = [(time.time(), "sweep started")]
        wait_for_checkpoint(driver, tmp_path / "node_loss", "checkpoint_000000")
        # The trial with the most passes still to run. Its node is killed in-process once the driver
        # shows the pass after that checkpoint's: Tune registers a checkpoint by a save call to the
        # trial after the pass is reported, and asks for the next pass only then. (The CLI takes
        # seconds to start, in which a small trial can finish: a fresh-clone CI run lost that race.)
        victim = min(
            (t for t in trial_dirs(tmp_path / "node_loss") if list(t.glob("checkpoint_*/checkpoint.pt"))),
            key=lambda t: max(t.glob("checkpoint_*")).name,
        )
        checkpoint = sorted(victim.glob("checkpoint_*"))[-1]
        lost = nodes_of(checkpoint)[-1]["node_id"]  # read now: with keep 1 the next pass deletes it
        reported = f"] {victim.name.rsplit('_', 2)[0]}  pass {int(checkpoint.name.split('_')[1]) + 2}/{PASSES_LOST}  "
        deadline = time.monotonic() + 120
        while reported not in (tmp_path / "driver.log").read_text():  # polled: the log is all there is
            assert driver.poll() is None and time.monotonic() < deadline, f"no line {reported!r} in the log"
            time.sleep(0.1)
        kill_node(lost)
        passes_before = epochs_in(sorted(victim.glob("checkpoint_*"))[-1])  # the last checkpoint before the kill
        timeline.append(
            (
                time.time(),
                f"killed node ...{lost[-5:]} (its raylet and what it started) while "
                f"{victim.name} ran pass {passes_before + 1}",
            )
        )
        assert driver.wait(timeout=600) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    timeline.append((time.time(), "sweep finished, results written"))

    assert "Failure # 1" in (victim / "error.txt").read_text()
    # The CLI's kill-node: a node that is gone is named in a clean error.
    refused = cli("sweep.local_cluster", "kill-node", lost)
    assert refused.returncode != 0 and lost in refused.stderr and "Traceback" not in refused.stderr
    last = sorted(victim.glob("checkpoint_*"))[-1]
    assert_complete_history(last, passes=PASSES_LOST)  # every pass exactly once
    runs = nodes_of(last)
    assert runs[0]["node_id"] == lost and runs[-1]["node_id"] != lost
    assert 1 < runs[-1]["first_epoch"] <= passes_before + 1  # from its checkpoint, not from scratch
    table = read_results(str(tmp_path / "node_loss"))
    assert sorted(table.column("trial_name").to_pylist()) == [
        "iwae_L1_M1_K2_s0",
        "iwae_L1_M1_K3_s0",
        "iwae_L1_M1_K4_s0",
        "vae_L1_M1_K1_s0",
    ]
    assert set(table.column("epochs").to_pylist()) == {PASSES_LOST}
    # The autoscaler gave up the lost node and started new ones in its place (the fake
    # provider numbers them on: a node id past the two first workers' is a replacement).
    nodes = {node["NodeID"]: node["Alive"] for node in ray.nodes() if node["NodeID"].startswith(WORKER_ID_PREFIX)}
    assert nodes[lost] is False
    assert max(nodes) > WORKER_ID_PREFIX + "00002", nodes
    timeline.append(
        (
            runs[-1]["started_at"],
            f"{victim.name} restarted on node ...{runs[-1]['node_id'][-5:]} from "
            f"its pass-{runs[-1]['first_epoch'] - 1} checkpoint",
        )
    )
    for moment, event in sorted(timeline):  # the node-loss timeline (pytest -s shows it)
        print(f"{moment - timeline[0][0]:6.1f} s  {event}")


def test_a_killed_driver_resumes_on_the_cluster_with_nothing_lost_or_run_twice(cluster, mnist_dir, tmp_path):
    command = sweep_command(space_file(tmp_path, "driver_loss", passes=6, train_images=4000), tmp_path, mnist_dir)
    with (tmp_path / "driver.log").open("w") as log:
        driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_checkpoint(driver, tmp_path / "driver_loss", "checkpoint_000001", log=tmp_path / "driver.log")
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver only: the cluster is in its own session
        driver.wait()
    assert not (tmp_path / "driver_loss" / "results").exists()
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    table = read_results(str(tmp_path / "driver_loss"))
    assert sorted(table.column("trial_name").to_pylist()) == ["iwae_L1_M1_K3_s0", "vae_L1_M1_K1_s0"]
    assert table.column("epochs").to_pylist() == [6, 6]
    for trial in trial_dirs(tmp_path / "driver_loss"):
        last = sorted(trial.glob("checkpoint_*"))[-1]
        assert_complete_history(last, passes=6)  # nothing run twice, nothing skipped
        assert head_node_id() not in {run["node_id"] for run in nodes_of(last)}  # the head has no GPU


def test_a_local_storage_the_nodes_do_not_share_is_refused_before_any_trial(cluster, mnist_dir, tmp_path):
    # "Not shared", honestly: the driver runs in its own mount namespace with a private tmpfs
    # over the storage folder, so the folder it writes is not the one the nodes see -- as a
    # head's local disk is not a worker's. (unshare -rm: an unprivileged user namespace.)
    storage = tmp_path / "storage"
    storage.mkdir()
    command = sweep_command(space_file(tmp_path, "unshared"), storage, mnist_dir)
    run = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs tmpfs "{storage}" && exec "$@"', "sh", *command],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "does not see the sweep's marker" in run.stderr and "s3://" in run.stderr and "NFS" in run.stderr
    assert list(storage.iterdir()) == []  # nothing reached the nodes' folder
    assert "pass 1/" not in run.stdout + run.stderr


def test_a_node_without_mnist_or_network_is_named_in_the_error(cluster, tmp_path):
    # No network, honestly: the only mirror the node may use is a port on which nothing listens.
    load = ray.remote(num_cpus=1, num_gpus=1)(load_node_data).options(  # a GPU: it runs on a gpu_worker node
        runtime_env={"env_vars": {"IWAE_MNIST_MIRRORS": "http://127.0.0.1:9/"}}
    )
    with pytest.raises(ray.exceptions.RayTaskError) as raised:
        ray.get(load.remote(TrainConfig(), str(tmp_path / "no_mnist"), "cpu"), timeout=120)
    error = raised.value.cause
    assert isinstance(error, DataError), raised.value
    assert f"Ray node {WORKER_ID_PREFIX}" in str(error) and "http://127.0.0.1:9/" in str(error)
    assert "could not be downloaded" in str(error) and "IWAE_MNIST_MIRRORS" in str(error)
    assert "setup_commands" in str(error) and str(tmp_path / "no_mnist") in str(error)
