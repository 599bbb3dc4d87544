"""--tracker mlflow and --tracker wandb: each trial a run, read back through MLflow's own client from
the store embedded in the sweep folder, and from W&B's offline run files with W&B's own record
schema (real MLflow and W&B, real local Ray, real MNIST)."""

import json
import os
import signal
import struct
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TINY_SPACE, tiny_space
from mlflow.tracking import MlflowClient
from ray import tune

from sweep.run import SweepInterrupted, run_sweep
from sweep.space import SpaceError, SweepSpace, parse_space
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


def tracked_space(name: str, tracker: str) -> SweepSpace:
    return tiny_space(name, tracker=tracker, training={**TINY_SPACE["training"], "passes": PASSES, "snr_every": PASSES})


def test_each_trial_is_one_mlflow_run_with_its_passes_and_evaluation_across_a_resume(local_ray, mnist_dir, tmp_path):
    space = tracked_space("tracked", "mlflow")
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


def wandb_records(run_file: Path) -> Iterator:
    """The records of a W&B run file (`run-<id>.wandb`), parsed with W&B's own schema: W&B has no
    reader of its own for them since its Go core took over; the framing is LevelDB's log format
    (32 KiB blocks of chunks, each with a 7-byte header: CRC, length, type) after a 7-byte W&B header."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, position, pending = run_file.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", run_file
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left < 7 or (kind == 0 and length == 0):  # a block's padding
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or a record's last chunk
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_runs(folder: Path) -> dict:
    """Sweep `folder`'s W&B offline runs by run id: their run records, history rows, summary, files."""
    runs = defaultdict(lambda: {"run": [], "config": {}, "history": {}, "summary": {}, "files": set()})
    for run_dir in sorted((folder / "wandb").glob("offline-run-*")):
        (run_file,) = run_dir.glob("run-*.wandb")
        run_id = run_file.stem.removeprefix("run-")
        runs[run_id]["files"] |= {str(p.relative_to(run_dir / "files")) for p in (run_dir / "files").rglob("*.png")}
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                runs[run_id]["run"].append(record.run)
                runs[run_id]["config"] |= {item.key: json.loads(item.value_json) for item in record.run.config.update}
            elif kind == "config":  # a change to the run's config after it started
                runs[run_id]["config"] |= {item.key: json.loads(item.value_json) for item in record.config.update}
            elif kind == "history":
                row = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                runs[run_id]["history"].setdefault(row["_step"], row)  # a pass logged again after a kill: W&B's first
            elif kind == "summary":
                runs[run_id]["summary"] |= {
                    item.key: json.loads(item.value_json) for item in record.summary.update if item.key
                }
    return runs


def test_each_trial_is_one_wandb_run_with_its_passes_and_evaluation_across_a_resume(
    local_ray, mnist_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))  # not the user's W&B settings
    space = tracked_space("wandb_tracked", "wandb")
    folder = tmp_path / "wandb_tracked"
    with pytest.raises(SweepInterrupted):
        run_sweep(space, str(tmp_path), str(mnist_dir), callbacks=[CtrlCOnce(tmp_path / "stopped")])
    before = wandb_runs(folder)
    assert any(run["history"] for run in before.values()), "no run had logged its first pass when the sweep stopped"

    _, rows, failed = run_sweep(space, str(tmp_path), str(mnist_dir), resume=True)
    assert not failed and len(rows) == 2
    runs = wandb_runs(folder)
    assert sorted(runs) == sorted(row["trial_id"] for row in rows)  # one run id per trial, continued on resume
    for row in rows:
        run = runs[row["trial_id"]]
        assert {(r.display_name, r.run_group, r.project) for r in run["run"]} == {
            (row["trial_name"], "wandb_tracked", "wandb_tracked")
        }
        config = run["config"]
        assert (config["objective"], config["k"], config["passes"]) == (row["objective"], str(row["k"]), str(PASSES))
        assert (config["eval_k"], config["rank_metric"]) == ("50", row["rank_metric"])
        assert config["iwae_sweep.folder"] == str(folder) and not {"train", "data_dir"} & set(config)  # not Ray's
        history = [run["history"][step] for step in sorted(run["history"]) if "epoch" in run["history"][step]]
        assert [h["training_iteration"] for h in history] == list(range(1, PASSES + 1))  # each pass, at its step
        assert [h["epoch"] for h in history] == [1, 2] and all("train_bound" in h for h in history)
        assert not {"time_this_iter_s", "pid", "hostname"} & set().union(*history)  # Ray's bookkeeping left out
        # The k-sample evaluation, in the trial's own run's summary, with its image grids as the run's files.
        for name in ("test_nll", "test_nll_se", "rank_metric_value"):
            assert run["summary"][name] == pytest.approx(row[name]), name
        assert run["summary"]["evaluation.checkpoint_uri"] == row["checkpoint_uri"]
        assert f"images/samples_pass{PASSES:05d}.png" in run["files"], run["files"]


def test_tracker_mistakes_are_named_before_anything_runs(tmp_path):
    with pytest.raises(SpaceError, match=r"<bad>: tracker: 'wandb=x': expected mlflow .* mlflow=TRACKING_URI"):
        parse_space({**TINY_SPACE, "name": "bad", "tracker": "wandb=x"}, "<bad>")
    # No W&B login (a fresh W&B settings folder, no key, no .netrc), in its own process: W&B keeps
    # what this one's offline sweep set.
    no_login = {
        **{key: value for key, value in os.environ.items() if not key.startswith("WANDB_")},
        "WANDB_CONFIG_DIR": str(tmp_path / "no_login"),
        "NETRC": str(tmp_path / "no_netrc"),
    }
    checked = subprocess.run(
        [sys.executable, "-c", f"from sweep.trackers import check_tracker; check_tracker('wandb', {str(tmp_path)!r})"],
        capture_output=True,
        text=True,
        timeout=120,
        env=no_login,
    )
    assert checked.returncode == 1 and "TrackerError: --tracker wandb: no W&B account" in checked.stderr, checked.stderr
    assert "wandb login" in checked.stderr and "WANDB_MODE=offline" in checked.stderr
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
