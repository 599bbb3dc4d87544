"""Sweeps interrupted -- a killed trial, a killed driver, Ctrl+C, a stop between Ray Tune's writes -- and
what a resume makes of each: nothing lost, nothing run twice (real local Ray, real MNIST)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    TINY_SPACE,
    assert_complete_history,
    assert_same_evaluations,
    kill_driver,
    kill_sweep_at_first_checkpoint,
    resume_in_process,
    sweep_cli,
    tiny_space,
    trial_dirs,
    wait_for_checkpoint,
)
from pyarrow import fs as pafs
from ray import tune
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from iwae_model import TrainConfig, likelihood
from iwae_model.checkpoint import load_checkpoint, load_model
from sweep.columns import RESULTS
from sweep.evaluate import main as evaluate_main
from sweep.folder import write_spec
from sweep.results import (
    ResultsError,
    read_per_image,
    read_results,
)
from sweep.run import run_sweep


def test_resuming_a_sweep_that_stopped_before_tune_wrote_anything(local_ray, mnist_dir, tmp_path, capfd):
    space = tiny_space("early", training={**TINY_SPACE["training"], "passes": 1})
    write_spec(str(tmp_path / "early"), pafs.LocalFileSystem(), space, str(mnist_dir))  # and nothing else
    _, rows, failed = run_sweep(space, str(tmp_path), str(mnist_dir), resume=True)
    assert len(rows) == 2 and not failed and "its trials start again" in capfd.readouterr().err


KILLED_TRAINING = {**TINY_SPACE["training"], "passes": 5, "train_images": 2000}


class KillTrialOnce(tune.Callback):
    """SIGKILLs the IWAE trial's worker process right after its second pass is reported. Use it
    with KILLED_TRAINING: passes long enough that the worker is still training when the signal,
    sent from the driver, arrives."""

    def __init__(self):
        self.killed_pid = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.killed_pid is None and trial.config["train"]["objective"] == "iwae" and result["epoch"] == 2:
            self.killed_pid = result["pid"]
            os.kill(result["pid"], signal.SIGKILL)


def test_a_killed_trial_restarts_from_its_checkpoint(local_ray, mnist_dir, tmp_path):
    killer = KillTrialOnce()
    space = tiny_space("killed", training=KILLED_TRAINING)
    _, rows, _ = run_sweep(space, str(tmp_path), str(mnist_dir), callbacks=[killer])
    assert killer.killed_pid is not None and len(rows) == 2
    trial = next(p for p in trial_dirs(tmp_path / "killed") if p.name.startswith("iwae_"))
    assert "Failure # 1" in (trial / "error.txt").read_text()
    assert_complete_history(sorted(trial.glob("checkpoint_*"))[-1], passes=5)
    assert {r["epochs"] for r in rows} == {5}


# Burda's Table 2 in small: each first-stage trial continues under the other objective.


TWO_STAGE = {
    **TINY_SPACE,
    "name": "two_stage",
    "continue": {
        "training": {"passes": 4, "train_images": 2000, "lr": 1e-4, "schedule": "constant"},
        "switch": [
            {"from": {"objective": "vae"}, "to": {"objective": "iwae", "k": 3}},
            {"from": {"objective": "iwae"}, "to": {"objective": "vae", "k": 1}},
        ],
    },
}


def test_a_two_stage_sweep_continues_from_its_parents_and_resumes_without_retraining_stage_1(
    local_ray, mnist_dir, mnist, tmp_path, capfd
):
    command, sweep_dir = kill_sweep_at_first_checkpoint(TWO_STAGE, tmp_path, mnist_dir, "stage2")  # stage 2 midway

    def training_files() -> dict[Path, int]:  # the evaluation adds its events and HParams beside them
        return {
            path: path.stat().st_mtime_ns
            for trial in trial_dirs(sweep_dir)
            for path in trial.rglob("*")
            if not path.name.endswith((".evaluation", ".hparams"))
        }

    first_stage = training_files()
    assert sum(path.name == "checkpoint.pt" for path in first_stage) >= 2

    out, _ = resume_in_process(command, capfd)
    # Stage 1 was not trained again: not a file of its trials was written or added.
    assert training_files() == first_stage
    rows = {r["trial_name"]: r for r in read_results(str(sweep_dir)).to_pylist()}
    assert sorted(rows) == [
        "iwae_L1_M1_K3_s0",
        "iwae_L1_M1_K3_s0_from_vae_L1_M1_K1_s0",
        "vae_L1_M1_K1_s0",
        "vae_L1_M1_K1_s0_from_iwae_L1_M1_K3_s0",
    ]
    for name, parent in (
        ("iwae_L1_M1_K3_s0_from_vae_L1_M1_K1_s0", "vae_L1_M1_K1_s0"),
        ("vae_L1_M1_K1_s0_from_iwae_L1_M1_K3_s0", "iwae_L1_M1_K3_s0"),
    ):
        child = rows[name]
        assert child["sweep_stage"] == 2 and rows[parent]["sweep_stage"] == 1 and child["parent_trial_name"] == parent
        # It started from the checkpoint its parent's row was evaluated from (both the best by validation bound).
        assert child["parent_checkpoint_uri"] == rows[parent]["checkpoint_uri"]
        assert json.loads(child["config"])["init_from"] == rows[parent]["checkpoint_uri"]
        checkpoints = sorted(Path(child["checkpoint_uri"]).parent.glob("checkpoint_*"))
        state = load_checkpoint(checkpoints[-1])
        assert_complete_history(checkpoints[-1], passes=4)
        assert {row["lr"] for row in state["history"]} == {1e-4}
        # Its first pass (100 steps at lr 1e-4) starts where the parent's weights are on the child's
        # objective, hundreds of nats from where a fresh model starts.
        objective = TrainConfig.from_dict(json.loads(child["config"])).build_objective()
        parent_model, _, _ = load_model(Path(rows[parent]["checkpoint_uri"]), "cpu")
        start = likelihood.bound(parent_model, mnist.binarized_once("valid"), objective).mean().item()
        fresh = (
            likelihood.bound(TrainConfig(k=3).build_model().eval(), mnist.binarized_once("valid"), objective)
            .mean()
            .item()
        )
        assert abs(state["history"][0]["valid_bound"] - start) < 0.1 * abs(fresh - start)
    assert "Table 2: second stage continued from the first stage's best checkpoint" in out
    assert "| vae_L1_M1_K1_s0 | " in out and "| iwae_L1_M1_K3_s0 | " in out
    # Re-running the evaluation stage alone (`python -m sweep.evaluate`, here in this process) finds
    # both stages' checkpoints.
    evaluate_main([str(sweep_dir), "--k", "20", "--images", "10"])
    table = read_results(str(sweep_dir)).to_pylist()
    assert sorted(r["trial_name"] for r in table) == sorted(rows) and {r["eval_k"] for r in table} == {20}


def test_a_sweep_on_s3_checkpoints_restarts_and_writes_parquet_there(local_ray, mnist_dir, s3_storage):
    from pyarrow import fs as pafs

    killer = KillTrialOnce()
    space = tiny_space("on_s3", training=KILLED_TRAINING)
    path, rows, _ = run_sweep(space, s3_storage("sweeps"), str(mnist_dir), callbacks=[killer])
    assert killer.killed_pid is not None  # the IWAE trial came back from its checkpoint on S3
    assert path == "iwae-bucket/sweeps/on_s3/results/results.parquet" and {r["epochs"] for r in rows} == {5}
    assert all(r["checkpoint_uri"].startswith("s3://iwae-bucket/sweeps/on_s3/") for r in rows)

    s3, root = pafs.FileSystem.from_uri(s3_storage("sweeps/on_s3"))
    names = [info.path for info in s3.get_file_info(pafs.FileSelector(root, recursive=True))]
    assert sum(name.endswith("/checkpoint.pt") for name in names) >= 2
    events = [name for name in names if "/events.out.tfevents." in name]  # each trial's run, in its folder
    assert (
        sum(name.endswith(".evaluation") for name in events) == 2
        and sum(name.endswith(".hparams") for name in events) == 2
    )
    assert len(events) > 4  # the curves and images too
    table = read_results(s3_storage("sweeps/on_s3"))
    assert table.num_rows == 2 and table.schema.equals(RESULTS.arrow())

    _, again, _ = run_sweep(space, s3_storage("sweeps"), str(mnist_dir), resume=True)
    assert_same_evaluations(again, rows)


def test_ctrl_c_stops_before_the_evaluation_and_says_what_is_unfinished(mnist_dir, tmp_path):
    space = {
        **TINY_SPACE,
        "name": "interrupted",
        "training": {**TINY_SPACE["training"], "passes": 8, "train_images": 2000},
    }
    with (tmp_path / "stderr.txt").open("w") as err:
        driver = subprocess.Popen(sweep_cli(space, tmp_path, mnist_dir), stdout=subprocess.DEVNULL, stderr=err)
        wait_for_checkpoint(driver, tmp_path / "store" / "interrupted", "checkpoint_000000")
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=120) == 1
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "did not finish" in stderr and "/8 passes)" in stderr and "--resume" in stderr
    assert not (tmp_path / "store" / "interrupted" / "results").exists()


def evaluated_rows(sweep_dir: Path) -> list[dict]:
    """The rows of the sweep's results file as it stands (none before the first is written)."""
    try:
        return read_results(str(sweep_dir)).to_pylist()
    except ResultsError:  # not written yet
        return []


def test_a_finished_trial_is_evaluated_while_the_others_train_and_a_resume_keeps_it(
    local_ray, mnist_dir, tmp_path, capfd
):
    # One trial at a time, the one-pass VAE first: its evaluation runs on the core it left free
    # while the IWAE trains its 40 passes.
    space = {
        **TINY_SPACE,
        "name": "stream",
        "experiments": [{"objective": "vae", "k": 1, "passes": 1}, {"objective": "iwae", "k": 3}],
        "training": {"passes": 40, "train_images": 2000, "test_images": 100},
    }
    command = sweep_cli(space, tmp_path, mnist_dir, "--max-concurrent", "1")
    sweep_dir, log = tmp_path / "store" / "stream", tmp_path / "driver.txt"
    with log.open("w") as out:
        driver = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (before := evaluated_rows(sweep_dir)):  # polled: the file is what a user sees appear
            assert driver.poll() is None, f"the sweep ended first:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no results within 300 s"
            time.sleep(0.2)
        iwae = next(sweep_dir.glob("iwae_*"))
        passes_done = max((int(p.name.rsplit("_", 1)[1]) + 1 for p in iwae.glob("checkpoint_*")), default=0)
        query = subprocess.run(
            [sys.executable, "-m", "sweep.query", str(sweep_dir)], capture_output=True, text=True, timeout=120
        )
    finally:
        kill_driver(driver)
    assert [row["trial_name"] for row in before] == ["vae_L1_M1_K1_s0"] and before[0]["epochs"] == 1
    assert passes_done < 40, "the IWAE trial had finished before the VAE's evaluation appeared"
    assert query.returncode == 0 and f"{before[0]['test_nll']:.2f}" in query.stdout, query.stderr
    assert "vae_L1_M1_K1_s0 evaluated: test NLL" in log.read_text()

    resume_in_process(command, capfd)
    rows = {row["trial_name"]: row for row in read_results(str(sweep_dir)).to_pylist()}
    assert sorted(rows) == ["iwae_L1_M1_K3_s0", "vae_L1_M1_K1_s0"] and rows["iwae_L1_M1_K3_s0"]["epochs"] == 40
    kept = rows["vae_L1_M1_K1_s0"]
    assert (kept["evaluation_id"], kept["test_nll"]) == (before[0]["evaluation_id"], before[0]["test_nll"])
    (evaluation,) = sweep_dir.glob("vae_*/events.out.tfevents.*.evaluation")
    events = EventAccumulator(str(evaluation))
    events.Reload()
    assert [event.value for event in events.Scalars("evaluation/test_nll")] == [pytest.approx(kept["test_nll"])]
    per_image = read_per_image(str(sweep_dir)).to_pandas()
    assert per_image.groupby("trial_name")["evaluation_id"].unique().map(list).to_dict() == {
        name: [row["evaluation_id"]] for name, row in rows.items()
    }
