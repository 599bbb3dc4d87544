"""What the cluster costs a sweep: the same 8 one-pass trials on 2,000 training images run on a
local Ray and on the rehearsal cluster (cluster.local.yaml: GPU workers scaled up from zero),
in one run, with figures printed as JSON lines.

    python -m sweep.bench_cluster [--data-dir DIR]

Figures: seconds from `python -m sweep.run` starting to the first trial running (on the
cluster: on a worker the autoscaler started for it), and the per-trial scheduling overhead --
the sweep's wall time less that start-up, the trials' own training time (divided by how many
ran at once) and the evaluation, per trial -- with its cluster/local ratio. Both sweeps run 2
trials at once with 1 CPU each. It starts and takes down its own rehearsal cluster.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from iwae_model.data import default_data_dir
from iwae_model.errors import exit_with

from .local_cluster import LocalClusterError, down, read_state, session_processes, up
from .results import read_results

CONCURRENT = 2
SPACE = {
    "name": "bench_cluster",
    "experiments": [{"objective": "vae", "k": [1, 2, 3, 4]}],
    "seeds": [0, 1],
    "training": {"passes": 1, "train_images": 2000, "test_images": 100},
    "evaluation": {"k": 10, "images": 20},
    "resources": {"cpus_per_trial": 1},
    "checkpoints": {"keep": 1, "every": 1},
}


def timed_sweep(folder: Path, data_dir: str, *cluster_args: str) -> dict:
    """Run the benchmark sweep in `folder` as a user would; its figures."""
    (folder / "space.yaml").write_text(yaml.safe_dump(SPACE))
    command = [
        sys.executable,
        "-m",
        "sweep.run",
        "--space",
        str(folder / "space.yaml"),
        "--storage",
        str(folder),
        "--data-dir",
        data_dir,
        "--max-concurrent",
        str(CONCURRENT),
        *cluster_args,
    ]
    start = time.time()
    run = subprocess.run(command, capture_output=True, text=True)
    wall = time.time() - start
    if run.returncode != 0:
        exit_with(f"the benchmark sweep failed ({' '.join(command)}):\n{run.stderr[-3000:]}")
    rows = read_results(str(folder / SPACE["name"])).to_pylist()
    runs = [json.loads(row["train_nodes"])[0] for row in rows]
    first_trial = min(run["started_at"] for run in runs) - start
    training = sum(row["train_seconds"] for row in rows) / CONCURRENT
    evaluation = sum(row["eval_seconds"] for row in rows)
    return {
        "trials": len(rows),
        "wall_s": round(wall, 2),
        "first_trial_running_s": round(first_trial, 2),
        "training_s_per_slot": round(training, 2),
        "evaluation_s": round(evaluation, 2),
        "overhead_s_per_trial": round((wall - first_trial - training - evaluation) / len(rows), 3),
        "nodes": len({run["node_id"] for run in runs}),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sweep.bench_cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir", help="data folder, every dataset's files (default: $IWAE_DATA_DIR, then ~/.cache/iwae-sweep/data)"
    )
    args = parser.parse_args(argv)
    data_dir = str(default_data_dir(args.data_dir))
    if (state := read_state()) is not None and session_processes(state["session"]):
        exit_with(
            "a local cluster is already up; the benchmark starts its own: python -m sweep.local_cluster down first"
        )
    with tempfile.TemporaryDirectory(prefix="bench_cluster_") as folder:
        (Path(folder) / "local").mkdir()
        local = timed_sweep(Path(folder) / "local", data_dir)
        print(json.dumps({"figure": "local_ray", **local}), flush=True)
        try:
            up()
        except LocalClusterError as error:
            exit_with(error)
        try:
            (Path(folder) / "cluster").mkdir()
            cluster = timed_sweep(
                Path(folder) / "cluster", data_dir, "--address", "auto", "--gpus-per-trial", "0.5", "--eval-gpus", "0.5"
            )
        finally:
            down()
    print(json.dumps({"figure": "rehearsal_cluster", **cluster}), flush=True)
    print(
        json.dumps(
            {
                "figure": "cluster_vs_local",
                "first_trial_running_s": [cluster["first_trial_running_s"], local["first_trial_running_s"]],
                "overhead_ratio": round(cluster["overhead_s_per_trial"] / local["overhead_s_per_trial"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
