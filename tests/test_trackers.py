"""--tracker mlflow: each trial an MLflow run, read back through MLflow's own client from the store
embedded in the sweep folder (real MLflow, real local Ray, real MNIST)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_SPACE, tiny_space
from mlflow.tracking import MlflowClient
from ray import tune

from sweep.run import SweepInterrupted, run_sweep
from sweep.space import SpaceError, parse_space
from sweep.trackers import TrackerError, check_tracker

PASSES = 2


class CtrlCOnce(tune.Callback):
    """Ctrl+C (SIGINT to this process, which Ray Tune turns into a clean stop) at the sweep's first
    reported pass. Tune pickles its callbacks with the sweep and the resume runs that copy: the
    file it leaves keeps the copy from stopping the resume too."""

    def __init__(self, done: Path) -> None:
        self.done = done

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not self.done.exists():
            self.done.touch()
            os.kill(os.getpid(), signal.SIGINT)


def runs_by_name(client: MlflowClient, name: str) -> dict:
    experiment = client.get_experiment_by_name(name)
    return {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}


def test_each_trial_is_one_mlflow_run_with_its_passes_and_evaluation_across_a_resume(local_ray, mnist_dir, tmp_path):
    space = tiny_space(
        "tracked", tracker="mlflow", training={**TINY_SPACE["training"], "passes": PASSES, "snr_every": PASSES}
    )
    folder = tmp_path / "tracked"
    with pytest.raises(SweepInterrupted):
        run_sweep(space, str(tmp_path), str(mnist_dir), callbacks=[CtrlCOnce(tmp_path / "stopped")])
    client = MlflowClient(f"sqlite:///{folder}/mlflow/mlflow.db")
    before = runs_by_name(client, "tracked")
    stopped = [run for run in before.values() if client.get_metric_history(run.info.run_id, "epoch")]
    assert stopped, "no run had logged its first pass when the sweep stopped"
    assert all(len(client.get_metric_history(run.info.run_id, "epoch")) < PASSES for run in stopped)

    _, rows, failed = run_sweep(space, str(tmp_path), str(mnist_dir), resume=True)
    assert not failed and len(rows) == 2
    runs = runs_by_name(client, "tracked")
    assert sorted(runs) == sorted(row["trial_name"] for row in rows)  # one run per trial, none twice
    assert {name: runs[name].info.run_id for name in before} == {name: r.info.run_id for name, r in before.items()}
    experiment = client.get_experiment_by_name("tracked")
    assert experiment.artifact_location == (folder / "mlflow" / "artifacts").as_uri()
    for row in rows:
        run = client.get_run(runs[row["trial_name"]].info.run_id)
        assert run.data.tags["ray_trial_id"] == row["trial_id"]
        params = run.data.params
        assert (params["objective"], params["k"], params["passes"]) == (row["objective"], str(row["k"]), str(PASSES))
        assert (params["eval_k"], params["rank_metric"]) == ("50", row["rank_metric"])
        for metric in ("epoch", "training_iteration", "train_bound", row["rank_metric"]):
            history = client.get_metric_history(run.info.run_id, metric)
            assert [m.step for m in history] == list(range(1, PASSES + 1)), metric  # each pass once
        assert [m.value for m in client.get_metric_history(run.info.run_id, "epoch")] == [1, 2]
        # The k-sample evaluation, logged to the trial's own run at the evaluated pass.
        for name in ("test_nll", "test_nll_se", "rank_metric_value"):
            (logged,) = client.get_metric_history(run.info.run_id, name)
            assert (logged.value, logged.step) == (pytest.approx(row[name]), row["epochs"]), name
        assert run.data.tags["evaluation.checkpoint_uri"] == row["checkpoint_uri"]
        images = [Path(a.path).name for a in client.list_artifacts(run.info.run_id, "images")]
        assert f"samples_pass{PASSES:05d}.png" in images and f"reconstructions_pass{PASSES:05d}.png" in images


def test_tracker_mistakes_are_named_before_anything_runs(tmp_path):
    with pytest.raises(SpaceError, match=r"<bad>: tracker: 'wandb': expected mlflow .* mlflow=TRACKING_URI"):
        parse_space({**TINY_SPACE, "name": "bad", "tracker": "wandb"}, "<bad>")
    with pytest.raises(TrackerError, match=r"--tracker mlflow=URI"):
        check_tracker("mlflow", "s3://bucket/sweeps")
    # MLflow not installed: the command says which extra to install, without a traceback.
    blocked = "import sys; sys.modules['mlflow'] = None; from sweep.run import main; main(sys.argv[1:])"
    space = Path(__file__).resolve().parents[1] / "search_spaces" / "quick.yaml"
    done = subprocess.run(
        [sys.executable, "-c", blocked, "--space", str(space), "--storage", str(tmp_path), "--tracker", "mlflow"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and 'pip install -e ".[mlflow]"' in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
