"""End-to-end sweeps on a real local Ray cluster, with real MNIST, Parquet and TensorBoard files."""

import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml
from conftest import FLOAT32_REORDER_RTOL, TINY_PASSES, TINY_SPACE
from google.protobuf import json_format
from pyarrow import fs as pafs
from ray import tune
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from iwae_model import TrainConfig, likelihood
from iwae_model.checkpoint import load_checkpoint, load_model
from sweep.cluster import LOOPBACK_SWITCH, ClusterError, check_gpus
from sweep.folder import write_spec
from sweep.plan import drawn_trials, plan_sweep
from sweep.query import main as query_main
from sweep.results import (
    PER_IMAGE_FILE,
    PER_IMAGE_SCHEMA,
    RESULTS_FILE,
    SCHEMA,
    ResultsError,
    read_evaluated,
    read_per_image,
    read_results,
    write_evaluated,
)
from sweep.run import dry_run, run_sweep
from sweep.space import SpaceError, load_space, parse_space
from sweep.trials import NODES_FILE
from sweep.tune_state import saved_results

PASSES = TINY_PASSES
TINY = TINY_SPACE


def tiny_space(name: str, **changes):
    return parse_space({**TINY, "name": name, **changes}, f"<{name}>")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def finished_sweep(local_ray, mnist_dir, tmp_path_factory):
    storage = tmp_path_factory.mktemp("storage")
    path, rows, _ = run_sweep(tiny_space("tiny"), str(storage), str(mnist_dir))
    return storage / "tiny", Path(path), rows


def trial_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.startswith(("vae_", "iwae_")))


def assert_complete_history(checkpoint_dir: Path, passes: int = PASSES):
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


def test_parquet_has_one_typed_finite_row_per_trial(finished_sweep):
    sweep_dir, path, rows = finished_sweep
    assert path == sweep_dir / "results" / "results.parquet"
    table = read_results(str(sweep_dir))
    assert table.schema.equals(SCHEMA, check_metadata=True)
    assert table.num_rows == 2 == len(rows)
    records = table.to_pylist()
    assert sorted(r["trial_name"] for r in records) == ["iwae_L1_M1_K3_s0", "vae_L1_M1_K1_s0"]
    for record in records:
        for column in (
            "test_nll",
            "test_nll_se",
            "test_bound",
            "train_bound",
            "valid_bound",
            "train_seconds",
            "eval_seconds",
        ):
            assert math.isfinite(record[column]), column
        assert 90 < record["test_nll"] < 400 and record["test_bound"] < -record["test_nll"]
        assert record["eval_k"] == 50 and record["eval_images"] == 40 and record["epochs"] == PASSES
        assert record["comparable_to_papers"] is False and record["sweep"] == "tiny"
        assert len(record["active_units"]) == 1 and Path(record["checkpoint_uri"]).is_dir()
        # A sweep that asked for no GPU trains and evaluates on the CPU, in IEEE float32, never moved.
        assert (record["device"], record["train_device"]) == ("cpu", "cpu")
        assert (record["eval_float32"], record["train_float32"]) == ("ieee", "ieee")
        assert [record[f"{part}_gpu_{what}"] for part in ("eval", "train") for what in ("name", "capability")] == [
            None
        ] * 4
        assert record["generator_reseeded_at"] is None
    assert table.schema.field("timestamp").type == pa.timestamp("ms", tz="UTC")
    assert not list(path.parent.glob(".tmp-*"))  # the atomic write left nothing behind


def test_checkpoints_hold_the_scientific_record(finished_sweep):
    sweep_dir, _, _ = finished_sweep
    for trial in trial_dirs(sweep_dir):
        checkpoints = sorted(trial.glob("checkpoint_*"))
        assert 1 <= len(checkpoints) <= 2  # keep=1: the best by validation bound, plus the latest
        assert_complete_history(checkpoints[-1])


def test_the_evaluated_rows_read_back_as_written_and_a_damaged_file_is_named(finished_sweep, tmp_path):
    # What a resumed sweep keeps: the rows and per-image columns, rewritten as they were.
    sweep_dir, _, rows = finished_sweep
    local = pafs.LocalFileSystem()
    evaluated = read_evaluated(str(sweep_dir), local)
    assert sorted(evaluated) == sorted(row["trial_id"] for row in rows)
    write_evaluated(str(tmp_path), local, evaluated)
    for name in (RESULTS_FILE, PER_IMAGE_FILE):
        assert pq.read_table(tmp_path / name).equals(pq.read_table(sweep_dir / name), check_metadata=True)
    (tmp_path / RESULTS_FILE).write_bytes(b"not parquet")
    with pytest.raises(ResultsError, match="delete .*results.parquet and .*per_image.parquet to evaluate"):
        read_evaluated(str(tmp_path), local)
    assert read_evaluated(str(tmp_path / "nothing yet"), local) == {}


def test_byte_flips_in_the_results_footer_get_the_usual_error_never_a_traceback(finished_sweep, tmp_path, capsys):
    # The footer holds the column names, the schema metadata and the statistics; flipping a byte's
    # high bit there gave sweep.query UnicodeDecodeError and JSONDecodeError tracebacks.
    sweep_dir, _, _ = finished_sweep
    good = (sweep_dir / RESULTS_FILE).read_bytes()
    footer = int.from_bytes(good[-8:-4], "little")
    damaged = tmp_path / "results.parquet"
    outcomes = {"read": 0, "refused": 0}
    for position in range(len(good) - 8 - footer, len(good) - 8, max(1, footer // 100)):
        damaged.write_bytes(good[:position] + bytes([good[position] ^ 0x80]) + good[position + 1 :])
        try:
            query_main([str(damaged)])
            outcomes["read"] += 1
        except SystemExit as refused:
            assert str(refused.code).startswith(f"error: {damaged}"), (position, refused.code)
            outcomes["refused"] += 1
    capsys.readouterr()
    assert outcomes["refused"] > 0 and outcomes["read"] > 0, outcomes  # both kinds of flip were met
    config = pq.read_table(sweep_dir / RESULTS_FILE)
    config = config.set_column(config.schema.get_field_index("config"), "config", pa.array(["{"] * len(config)))
    pq.write_table(config, damaged)
    with pytest.raises(ResultsError, match="not a readable Parquet file"):
        read_results(str(damaged))


def test_tensorboard_curves_and_images_read_back(finished_sweep):
    sweep_dir, _, _ = finished_sweep
    for trial in trial_dirs(sweep_dir):
        scalars = EventAccumulator(str(trial))
        scalars.Reload()
        for tag in ("train_bound", "test_bound", "valid_bound", "lr", "active_units", "active_units_L1"):
            values = scalars.Scalars(f"ray/tune/{tag}")
            assert [v.step for v in values] == list(range(1, PASSES + 1)), tag
        images = EventAccumulator(str(trial / "tb"), size_guidance={"images": 0})
        images.Reload()
        for tag in ("samples", "reconstructions"):
            shots = images.Images(tag)
            # Ten grids per trial at most; a 3-pass trial gets one every pass.
            assert [shot.step for shot in shots] == list(range(1, PASSES + 1)), tag
            assert shots[-1].width == shots[-1].height == 8 * 28


def hparams_sessions(folder: Path) -> dict[str, dict]:
    """The HParams plugin's sessions under `folder`, read from the event files as TensorBoard's
    plugin reads them (its data: the `hparams` plugin's summaries), by run."""
    runs = EventMultiplexer()
    runs.AddRunsFromDirectory(str(folder))
    runs.Reload()
    sessions = {}
    for run, tags in runs.PluginRunToTagToContent("hparams").items():
        for content in tags.values():
            data = HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                hparams = data.session_start_info.hparams
                sessions[run] = {key: json_format.MessageToDict(value) for key, value in hparams.items()}
    return sessions


def test_tensorboard_hparams_has_one_row_per_trial_with_its_final_figures(finished_sweep):
    sweep_dir, _, rows = finished_sweep
    sessions = hparams_sessions(sweep_dir)
    assert sorted(sessions) == sorted(f"hparams/{row['trial_name']}" for row in rows)  # Ray's own rows left out
    for row in rows:
        session = sessions[f"hparams/{row['trial_name']}"]
        assert session["objective"] == row["objective"] and session["k"] == row["k"] and "lr" in session
        scalars = EventAccumulator(str(sweep_dir / "hparams" / row["trial_name"]))
        scalars.Reload()
        assert scalars.Scalars("final/test_nll")[0].value == pytest.approx(row["test_nll"], rel=1e-6)
        assert math.isfinite(scalars.Scalars("final/valid_bound")[0].value)


def test_query_prints_the_table_from_parquet(finished_sweep, tmp_path):
    sweep_dir, _, _ = finished_sweep
    run = [sys.executable, "-m", "sweep.query", str(sweep_dir)]
    table = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert "| layers | M | K | VAE | IWAE |" in table and "not comparable to the papers" in table
    assert "[paper 86.76" in table  # VAE, 1 layer, k=1 from Burda's Table 1
    rows = json.loads(
        subprocess.run(
            [*run, "--format", "json", "--where", "objective=iwae", "--plot", str(tmp_path / "nll.png")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert [(r["variant"], r["k"]) for r in rows] == [("IWAE", 3)]
    assert (tmp_path / "nll.png").stat().st_size > 10_000
    bad = subprocess.run([*run, "--where", "colour=red"], capture_output=True, text=True)
    assert bad.returncode == 1 and "colour=red" in bad.stderr
    not_a_search = subprocess.run([*run, "--importance"], capture_output=True, text=True)
    assert not_a_search.returncode == 1 and "not a search's" in not_a_search.stderr


def test_importance_sampling_health_and_snr_reach_parquet_and_tensorboard(finished_sweep):
    sweep_dir, _, _ = finished_sweep
    records = read_results(str(sweep_dir)).to_pylist()
    per_image = read_per_image(str(sweep_dir)).to_pandas()
    assert read_per_image(str(sweep_dir)).schema.equals(PER_IMAGE_SCHEMA, check_metadata=True)
    # One evaluation per checkpoint, all with the same noise per image.
    assert len({r["evaluation_id"] for r in records}) == len(records) and len({r["noise"] for r in records}) == 1
    assert records[0]["noise"].startswith("seed 123, k 50, latents 50")  # same latent sizes: common noise
    for record in records:
        assert 1 <= record["ess_median"] <= 50 and 1 <= record["ess_mean"] <= 50
        assert 0 <= record["pareto_k_above_0_7"] <= 1 and math.isfinite(record["pareto_k_max"])
        mine = per_image[per_image["trial_id"] == record["trial_id"]].sort_values("image")
        assert mine["image"].tolist() == list(range(40)) and set(mine["evaluation_id"]) == {record["evaluation_id"]}
        assert mine["nll"].mean() == pytest.approx(record["test_nll"], rel=1e-12)
        assert mine["ess"].mean() == pytest.approx(record["ess_mean"], rel=1e-12)
        assert (mine["pareto_k"] > 0.7).mean() == pytest.approx(record["pareto_k_above_0_7"])
        # The SNR of the evaluated checkpoint's last measurement (snr_every = the last pass).
        assert record["snr_epoch"] == PASSES and record["snr_encoder_mean"] > 0 and record["snr_decoder_median"] > 0
        assert json.loads(record["snr"])["encoder_mean"] == record["snr_encoder_mean"]
    for trial in trial_dirs(sweep_dir):
        scalars = EventAccumulator(str(trial / "tb"))
        scalars.Reload()
        for tag in ("snr/encoder_mean", "snr/encoder_median", "snr/decoder_mean", "snr/decoder_median"):
            assert [v.step for v in scalars.Scalars(tag)] == [PASSES], tag
        record = next(r for r in records if trial.name.endswith(r["trial_id"]))
        evaluation = EventAccumulator(
            str(trial / "tb_evaluation" / record["evaluation_id"]), size_guidance={"histograms": 0}
        )
        evaluation.Reload()
        for name in ("test_nll", "ess_mean", "pareto_k_above_0_7"):
            (event,) = evaluation.Scalars(f"evaluation/{name}")
            assert event.step == record["epochs"] and event.value == pytest.approx(record[name], rel=1e-6), name
        (histogram,) = evaluation.Histograms("evaluation/ess_per_image")
        assert histogram.histogram_value.num == 40 and histogram.histogram_value.max <= 50


def test_query_compares_two_checkpoints_paired_and_against_a_baseline(finished_sweep, tmp_path):
    sweep_dir, _, _ = finished_sweep
    records = {r["trial_name"]: r for r in read_results(str(sweep_dir)).to_pylist()}
    run = [sys.executable, "-m", "sweep.query", str(sweep_dir)]
    out = subprocess.run([*run, "--compare", "iwae_L1_M1_K3_s0", "objective=vae,k=1"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    expected = records["iwae_L1_M1_K3_s0"]["test_nll"] - records["vae_L1_M1_K1_s0"]["test_nll"]
    assert f"A - B = {expected:+.3f} nats over the same 40 test images (k=50); common noise: yes" in out.stdout
    paired = float(out.stdout.split("paired SE")[1].split()[0])
    unpaired = float(out.stdout.split("unpaired SE")[1].split()[0])
    assert 0 < paired < unpaired  # the same images: the images' own spread cancels
    table = subprocess.run(
        [*run, "--baseline", "vae_L1_M1_K1_s0", "--snr-plot", str(tmp_path / "snr.png")], capture_output=True, text=True
    )
    assert table.returncode == 0, table.stderr
    assert "Δ +0.000 ± 0.000" in table.stdout and f"Δ {expected:+.3f} ± {paired:.3f}" in table.stdout
    assert "Δ: mean per-image NLL difference to vae_L1_M1_K1_s0" in table.stdout
    assert (tmp_path / "snr.png").stat().st_size > 10_000
    for args, words in (
        (["--compare", "nope", "vae_L1_M1_K1_s0"], "--compare A 'nope': no trial of that label"),
        (["--compare", "layers=1", "vae_L1_M1_K1_s0"], "matches 2 checkpoints"),
        (["--baseline", "colour=red"], "'colour' is not a column"),
    ):
        bad = subprocess.run([*run, *args], capture_output=True, text=True)
        assert bad.returncode == 1 and words in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_the_evaluation_stage_reruns_alone_with_another_k(finished_sweep):
    sweep_dir, _, rows = finished_sweep
    before = {r["trial_name"]: r["test_nll"] for r in rows}
    out = subprocess.run(
        [sys.executable, "-m", "sweep.evaluate", str(sweep_dir), "--k", "200", "--images", "20", "--eval-actors", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 at a time, 0 GPU and 1 CPU each" in out.stderr  # two evaluations shared the two cores
    table = read_results(str(sweep_dir)).to_pylist()
    assert {r["eval_k"] for r in table} == {200} and {r["eval_images"] for r in table} == {20}
    assert {r["trial_name"] for r in table} == set(before)
    # A tighter estimate on a subset: different numbers from the same checkpoints.
    assert all(r["test_nll"] != before[r["trial_name"]] for r in table)
    missing = subprocess.run(
        [sys.executable, "-m", "sweep.evaluate", str(sweep_dir / "nope")], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 1 and "not a Ray Tune sweep folder" in missing.stderr


def test_an_existing_sweep_needs_resume_and_resume_reruns_nothing(finished_sweep, mnist_dir):
    sweep_dir, _, rows = finished_sweep
    with pytest.raises(SpaceError, match="--resume"):
        run_sweep(tiny_space("tiny"), str(sweep_dir.parent), str(mnist_dir))
    checkpoints = sorted(p.name for p in sweep_dir.glob("*/checkpoint_*"))
    _, again, _ = run_sweep(tiny_space("tiny"), str(sweep_dir.parent), str(mnist_dir), resume=True)
    assert sorted(p.name for p in sweep_dir.glob("*/checkpoint_*")) == checkpoints  # no trial re-ran
    assert_same_evaluations(again, rows)


def evaluate_cli(location: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sweep.evaluate", str(location)], capture_output=True, text=True, timeout=120
    )


SWEEP_DAMAGE = {  # name: (what is done to a copy of a finished sweep, words the error must hold)
    "spec not JSON": (lambda d: (d / "iwae_sweep.json").write_text("{half a fi"), ["iwae_sweep.json: damaged", "JSON"]),
    "spec of another shape": (
        lambda d: (d / "iwae_sweep.json").write_text('{"space": {}}'),
        ["iwae_sweep.json: damaged", "KeyError"],
    ),
    "no spec": (lambda d: (d / "iwae_sweep.json").unlink(), ["no iwae_sweep.json", "sweep.run"]),
    "experiment state not JSON": (
        lambda d: [f.write_text("{") for f in d.glob("experiment_state-*.json")],
        ["cannot read this sweep's experiment state", "restore the folder"],
    ),
    "searcher state cut short": (
        lambda d: [f.write_bytes(f.read_bytes()[:100]) for f in d.glob("basic-variant-state-*")],
        ["basic-variant-state-", "cannot read this sweep's experiment state", "restore the folder"],
    ),
    "node record not JSON": (
        lambda d: [f.write_text("[{") for f in d.glob("*/checkpoint_*/nodes.json")],
        ["nodes.json: damaged", "delete it"],
    ),
}


@pytest.mark.parametrize("damage", SWEEP_DAMAGE)
def test_a_damaged_sweep_folder_is_named_with_the_fix(finished_sweep, tmp_path, damage):
    sweep_dir, _, _ = finished_sweep
    copy = tmp_path / sweep_dir.name
    shutil.copytree(sweep_dir, copy)
    change, words = SWEEP_DAMAGE[damage]
    change(copy)
    out = evaluate_cli(copy)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert str(copy) in out.stderr and all(word in out.stderr for word in words), out.stderr


def test_resuming_with_another_space_is_refused(finished_sweep, mnist_dir):
    sweep_dir, _, _ = finished_sweep
    other = parse_space({**TINY, "name": "tiny", "experiments": [{"objective": "iwae", "k": 7}]}, "other.yaml")
    with pytest.raises(
        SpaceError, match=r"started from <tiny> \(2 trials\); other.yaml defines other trials \(1 trials\)"
    ):
        run_sweep(other, str(sweep_dir.parent), str(mnist_dir), resume=True)


def test_resuming_a_sweep_that_stopped_before_tune_wrote_anything(local_ray, mnist_dir, tmp_path, capfd):
    space = tiny_space("early", training={**TINY["training"], "passes": 1})
    write_spec(str(tmp_path / "early"), pafs.LocalFileSystem(), space, str(mnist_dir))  # and nothing else
    _, rows, failed = run_sweep(space, str(tmp_path), str(mnist_dir), resume=True)
    assert len(rows) == 2 and not failed and "its trials start again" in capfd.readouterr().err


@pytest.mark.parametrize(
    "space", sorted(path.stem for path in (Path(__file__).parents[1] / "search_spaces").glob("*.yaml"))
)
def test_dry_run_plans_every_shipped_space_and_writes_nothing(tmp_path, space):
    out = subprocess.run(
        [sys.executable, "-m", "sweep.run", "--space", space, "--dry-run", "--storage", str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = load_space(space)
    for trial in [*drawn_trials(loaded), *loaded.continued]:  # a search: the values drawn for the estimate
        assert trial.label() in out.stdout
    assert "Estimated wall time:" in out.stdout and "An estimate, calibrated" in out.stdout
    assert not (tmp_path / "store").exists()


def test_dry_run_estimate_is_within_a_factor_of_the_real_run(finished_sweep):
    # The calibrated part (optimizer steps) against the seconds the trials' passes took: the
    # median pass, as one pass of a fraction of a second can stall while a process starts beside
    # it (an evaluation's Ray worker). Factor 3: 60 steps on a shared 2-core machine are noisy.
    _, _, rows = finished_sweep
    plan = plan_sweep(tiny_space("tiny"), torch.device("cpu"), concurrent=2, eval_threads=2)
    estimate = {t.label: t.train_seconds / t.passes for t in plan.trials}
    for row in rows:
        elapsed = [0.0] + [r["train_seconds"] for r in load_checkpoint(row["checkpoint_uri"])["history"]]
        passes = [after - before for before, after in zip(elapsed, elapsed[1:])]
        ratio = statistics.median(passes) / estimate[row["trial_name"]]
        assert 1 / 3 < ratio < 3, (row["trial_name"], passes, estimate[row["trial_name"]])


def test_dry_run_on_a_cluster_counts_the_cluster_s_cpus(local_ray):
    # Joined with --address, the trials that fit at once come from the cluster, not this machine.
    space = tiny_space("plan", resources={"cpus_per_trial": 1})
    text = dry_run(space, "auto", max_concurrent=0)
    assert "2 trial(s) at once (the cluster at auto as it is now: 2 CPUs, 0 GPUs)" in text
    one = dry_run(tiny_space("plan", resources={"cpus_per_trial": 2}), "auto", max_concurrent=0)
    assert "1 trial(s) at once (the cluster at auto as it is now: 2 CPUs" in one


def test_ray_stays_on_loopback(local_ray):
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}


def test_a_local_sweep_ray_is_on_loopback():
    # What python -m sweep.run and sweep.evaluate start without --address, in a process that
    # has not inherited the tests' switch.
    env = {key: value for key, value in os.environ.items() if key != LOOPBACK_SWITCH}
    script = (
        "import ray; from sweep.cluster import init_ray; init_ray(None); "
        "print(sorted({n['NodeManagerAddress'] for n in ray.nodes()})); ray.shutdown()"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "['127.0.0.1']"


def test_a_gpu_that_cannot_exist_fails_fast(local_ray):
    with pytest.raises(ClusterError, match="--gpus-per-trial 0"):
        check_gpus(0.5, 0)


KILLED_TRAINING = {**TINY["training"], "passes": 5, "train_images": 2000}


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


def kill_sweep_at_first_checkpoint(space: dict, tmp_path: Path, mnist_dir: Path, stage: str) -> tuple[list[str], Path]:
    """Start `python -m sweep.run` on `space` and SIGKILL it (and the local Ray it started) once a
    trial in `<sweep>/<stage>` has written its first checkpoint; return the command and the sweep folder."""
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    command = [
        sys.executable,
        "-m",
        "sweep.run",
        "--space",
        str(tmp_path / "space.yaml"),
        "--storage",
        str(tmp_path / "store"),
        "--data-dir",
        str(mnist_dir),
    ]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    sweep_dir = tmp_path / "store" / space["name"]
    try:
        wait_for_checkpoint(driver, sweep_dir / stage, "checkpoint_000001")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    return command, sweep_dir


def delete_checkpoints_the_state_names(sweep_dir: Path) -> None:
    """The state a driver killed between Ray Tune deleting an old checkpoint and saving its
    experiment state leaves: the saved state names a checkpoint that is gone, a newer one is there."""
    for result in saved_results(str(sweep_dir), pafs.LocalFileSystem()):
        if result.checkpoint is None:
            continue
        named = Path(result.checkpoint.path)
        if not named.exists():  # the kill itself fell in that instant
            continue
        if sorted(named.parent.glob("checkpoint_*"))[-1] == named:  # the newer one Tune had just registered
            number = int(named.name.split("_")[1]) + 1
            shutil.copytree(named, named.parent / f"checkpoint_{number:06d}")
        shutil.rmtree(named)


def as_written_on_a_gpu(sweep_dir: Path) -> list[Path]:
    """Every checkpoint of the sweep with its generator state in a CUDA generator's layout, as a
    trial that ran on a GPU leaves it; returns the trials that have one."""
    trials = []
    for checkpoint in sweep_dir.glob("*/checkpoint_*/checkpoint.pt"):
        state = torch.load(checkpoint, weights_only=True)
        state["rng"] = {"generator": torch.arange(16, dtype=torch.uint8), "device": "cuda"}
        torch.save(state, checkpoint)
        trials.append(checkpoint.parent.parent)
    return sorted(set(trials))


@pytest.mark.parametrize("tune_state", ["saved", "not saved yet", "names a deleted checkpoint", "written on a GPU"])
def test_a_killed_driver_is_resumed_with_nothing_lost(mnist_dir, tmp_path, tune_state):
    # "not saved yet": Ray Tune writes tuner.pkl at once but its experiment state only at its
    # first sync; a driver killed before that left a folder whose
    # restore made a trial with an empty config, and the resumed sweep crashed.
    # "names a deleted checkpoint": killed between Tune deleting a checkpoint (checkpoints.keep)
    # and saving its state: restoring failed for good.
    space = {**TINY, "name": "driver", "training": {**TINY["training"], "passes": 8, "train_images": 2000}}
    command, sweep_dir = kill_sweep_at_first_checkpoint(space, tmp_path, mnist_dir, "")  # mid-sweep, with work to lose
    assert not (sweep_dir / "results").exists()
    if tune_state == "not saved yet":
        for path in [*sweep_dir.glob("basic-variant-state-*.json"), *sweep_dir.glob("experiment_state-*.json")]:
            path.unlink()
    if tune_state == "names a deleted checkpoint":
        delete_checkpoints_the_state_names(sweep_dir)
    moved = as_written_on_a_gpu(sweep_dir) if tune_state == "written on a GPU" else []
    # Resumed from those checkpoints: the trials whose checkpoint Tune's saved state names (the
    # kill can land after a trial's first checkpoint is written, before Tune saves its state:
    # that trial starts again from scratch, on the CPU, and nothing is reseeded).
    if moved:
        named = {
            Path(r.checkpoint.path).parent
            for r in saved_results(str(sweep_dir), pafs.LocalFileSystem())
            if r.checkpoint is not None
        }
        moved = [trial for trial in moved if trial in named]
    begun = trial_dirs(sweep_dir) if tune_state == "not saved yet" else []
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("stopped before Ray Tune first saved its state" in resumed.stderr) == bool(begun)
    if tune_state == "names a deleted checkpoint":  # (a kill can also land in that instant by itself)
        assert "continue from their newest checkpoint" in resumed.stderr
    assert "| layers | M | K | VAE | IWAE |" in resumed.stdout
    table = read_results(str(sweep_dir))
    assert sorted(table.column("trial_name").to_pylist()) == ["iwae_L1_M1_K3_s0", "vae_L1_M1_K1_s0"]
    assert table.column("epochs").to_pylist() == [8, 8]
    for trial in set(trial_dirs(sweep_dir)) - set(begun):
        assert_complete_history(sorted(trial.glob("checkpoint_*"))[-1], passes=8)
    # Resumed on the CPU from a GPU's checkpoint: same weights and position, a reseeded generator,
    # and the node record, Parquet and the trial's log say from which pass it is not bit-identical.
    reseeded_at = dict(zip(table.column("trial_name").to_pylist(), table.column("generator_reseeded_at").to_pylist()))
    assert bool(moved) == (tune_state == "written on a GPU")
    for trial in moved:
        last = sorted(trial.glob("checkpoint_*"))[-1]
        runs = json.loads((last / NODES_FILE).read_text())
        assert [run["generator_reseeded"] for run in runs] == [False, True]
        label = TrainConfig.from_dict(load_checkpoint(last)["config"]).label()
        assert reseeded_at[label] == runs[1]["first_epoch"]
    assert resumed.stderr.count("resumed on cpu from a checkpoint written on cuda") == len(moved)
    if tune_state != "written on a GPU":
        assert set(reseeded_at.values()) == {None}


# Burda's Table 2 in small: each first-stage trial continues under the other objective.
TWO_STAGE = {
    **TINY,
    "name": "two_stage",
    "continue": {
        "training": {"passes": 6, "train_images": 2000, "lr": 1e-4, "schedule": "constant"},
        "switch": [
            {"from": {"objective": "vae"}, "to": {"objective": "iwae", "k": 3}},
            {"from": {"objective": "iwae"}, "to": {"objective": "vae", "k": 1}},
        ],
    },
}


def test_a_two_stage_sweep_continues_from_its_parents_and_resumes_without_retraining_stage_1(
    mnist_dir, mnist, tmp_path
):
    command, sweep_dir = kill_sweep_at_first_checkpoint(TWO_STAGE, tmp_path, mnist_dir, "stage2")  # stage 2 midway

    def training_files() -> dict[Path, int]:  # the evaluation adds tb_evaluation/ beside them
        return {
            path: path.stat().st_mtime_ns
            for trial in trial_dirs(sweep_dir)
            for path in trial.rglob("*")
            if "tb_evaluation" not in path.parts
        }

    first_stage = training_files()
    assert sum(path.name == "checkpoint.pt" for path in first_stage) >= 2

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
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
        assert_complete_history(checkpoints[-1], passes=6)
        assert {row["lr"] for row in state["history"]} == {1e-4}
        # Its first pass (100 steps at lr 1e-4) starts where the parent's weights are on the child's
        # objective, hundreds of nats from where a fresh model starts.
        objective = TrainConfig.from_dict(json.loads(child["config"])).build_objective()
        parent_model, _, _ = load_model(Path(rows[parent]["checkpoint_uri"]), "cpu")
        start = likelihood.bound(parent_model, mnist.fixed("valid"), objective).mean().item()
        fresh = likelihood.bound(TrainConfig(k=3).build_model().eval(), mnist.fixed("valid"), objective).mean().item()
        assert abs(state["history"][0]["valid_bound"] - start) < 0.1 * abs(fresh - start)
    assert "Table 2: second stage continued from the first stage's best checkpoint" in resumed.stdout
    assert "| vae_L1_M1_K1_s0 | " in resumed.stdout and "| iwae_L1_M1_K3_s0 | " in resumed.stdout
    # Re-running the evaluation stage alone finds both stages' checkpoints.
    again = subprocess.run(
        [sys.executable, "-m", "sweep.evaluate", str(sweep_dir), "--k", "20", "--images", "10"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    table = read_results(str(sweep_dir)).to_pylist()
    assert sorted(r["trial_name"] for r in table) == sorted(rows) and {r["eval_k"] for r in table} == {20}


def test_a_second_stage_continues_another_finished_sweep(finished_sweep, local_ray, mnist_dir, tmp_path):
    parent_dir, _, _ = finished_sweep
    untouched = {path: path.stat().st_mtime_ns for path in parent_dir.rglob("*")}
    continued = {
        **TINY,
        "name": "continued",
        "continue": {
            "training": {"passes": 2},
            "switch": [{"from": {"objective": "vae"}, "to": {"objective": "iwae", "k": 3}}],
        },
    }
    space = replace(parse_space(continued, "<continued>"), init_from_sweep=str(parent_dir))
    _, rows, failed = run_sweep(space, str(tmp_path), str(mnist_dir))
    by_name = {row["trial_name"]: row for row in rows}
    assert not failed and sorted(by_name) == [
        "iwae_L1_M1_K3_s0",
        "iwae_L1_M1_K3_s0_from_vae_L1_M1_K1_s0",
        "vae_L1_M1_K1_s0",
    ]
    child = by_name["iwae_L1_M1_K3_s0_from_vae_L1_M1_K1_s0"]
    assert child["parent_checkpoint_uri"] == by_name["vae_L1_M1_K1_s0"]["checkpoint_uri"]
    assert child["parent_checkpoint_uri"].startswith(f"{parent_dir}/") and child["epochs"] == 2
    # Stage 1 is read from the other sweep, never trained or written to here.
    assert trial_dirs(tmp_path / "continued") == [] and len(trial_dirs(tmp_path / "continued" / "stage2")) == 1
    assert {path: path.stat().st_mtime_ns for path in parent_dir.rglob("*")} == untouched
    again = subprocess.run(
        [sys.executable, "-m", "sweep.evaluate", str(tmp_path / "continued"), "--k", "20", "--images", "10"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(read_results(str(tmp_path / "continued")).to_pylist()) == 3
    unknown = replace(
        parse_space({**continued, "name": "unknown", "experiments": [{"objective": "vae", "k": 7}]}, "<unknown>"),
        init_from_sweep=str(parent_dir),
    )
    with pytest.raises(SpaceError, match="no finished trial labelled vae_L1_M1_K7_s0 to continue"):
        run_sweep(unknown, str(tmp_path), str(mnist_dir))
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "sweep.run",
            "--space",
            "quick",
            "--init-from-sweep",
            str(parent_dir),
            "--storage",
            str(tmp_path / "cli"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 1 and "has no `continue` section" in cli.stderr and "Traceback" not in cli.stderr


@pytest.fixture
def s3_storage():
    """A real S3 API (moto's server) on 127.0.0.1; credentials travel in the URI, so Ray's
    workers need no environment."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1&allow_bucket_creation=true"
    yield lambda path: f"s3://testing:testing@iwae-bucket/{path}?{query}"
    server.stop()


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
    assert any("/tb/events.out.tfevents" in name for name in names)
    assert sum("/tb_evaluation/" in name and "tfevents" in name for name in names) == 2  # one file per trial
    table = read_results(s3_storage("sweeps/on_s3"))
    assert table.num_rows == 2 and table.schema.equals(SCHEMA)

    _, again, _ = run_sweep(space, s3_storage("sweeps"), str(mnist_dir), resume=True)
    assert_same_evaluations(again, rows)


def test_asha_stops_trials_worse_than_the_ones_before_them(local_ray, mnist_dir, tmp_path):
    # One trial at a time, the good one first: the later ones meet its record at the first rung.
    space = tiny_space(
        "asha",
        experiments=[{"objective": "iwae", "k": 3, "lr": [1e-3, 1e-7, 2e-7]}],
        training={**TINY["training"], "passes": 4},
    )
    _, rows, _ = run_sweep(space, str(tmp_path), str(mnist_dir), max_concurrent=1, asha=True)
    assert sorted((row["epochs"], json.loads(row["config"])["lr"]) for row in rows) == [(1, 1e-7), (1, 2e-7), (4, 1e-3)]
    table = subprocess.run(
        [sys.executable, "-m", "sweep.query", str(tmp_path / "asha")], capture_output=True, text=True, check=True
    ).stdout
    assert "IWAE lr=0.001" in table and "IWAE lr=1e-07" in table  # never averaged as if seeds


def test_ctrl_c_stops_before_the_evaluation_and_says_what_is_unfinished(mnist_dir, tmp_path):
    space = {**TINY, "name": "interrupted", "training": {**TINY["training"], "passes": 8, "train_images": 2000}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    with (tmp_path / "stderr.txt").open("w") as err:
        driver = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sweep.run",
                "--space",
                str(tmp_path / "space.yaml"),
                "--storage",
                str(tmp_path),
                "--data-dir",
                str(mnist_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        wait_for_checkpoint(driver, tmp_path / "interrupted", "checkpoint_000000")
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=120) == 1
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "did not finish" in stderr and "/8 passes)" in stderr and "--resume" in stderr
    assert not (tmp_path / "interrupted" / "results").exists()


def evaluated_rows(sweep_dir: Path) -> list[dict]:
    """The rows of the sweep's results file as it stands (none before the first is written)."""
    try:
        return read_results(str(sweep_dir)).to_pylist()
    except ResultsError:  # not written yet
        return []


def test_a_finished_trial_is_evaluated_while_the_others_train_and_a_resume_keeps_it(mnist_dir, tmp_path):
    # One trial at a time, the one-pass VAE first: its evaluation runs on the core it left free
    # while the IWAE trains its 40 passes.
    space = {
        **TINY,
        "name": "stream",
        "experiments": [{"objective": "vae", "k": 1, "passes": 1}, {"objective": "iwae", "k": 3}],
        "training": {"passes": 40, "train_images": 2000, "test_images": 100},
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    command = [
        sys.executable,
        "-m",
        "sweep.run",
        "--space",
        str(tmp_path / "space.yaml"),
        "--storage",
        str(tmp_path / "store"),
        "--data-dir",
        str(mnist_dir),
        "--max-concurrent",
        "1",
    ]
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
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert [row["trial_name"] for row in before] == ["vae_L1_M1_K1_s0"] and before[0]["epochs"] == 1
    assert passes_done < 40, "the IWAE trial had finished before the VAE's evaluation appeared"
    assert query.returncode == 0 and f"{before[0]['test_nll']:.2f}" in query.stdout, query.stderr
    assert "vae_L1_M1_K1_s0 evaluated: test NLL" in log.read_text()

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = {row["trial_name"]: row for row in read_results(str(sweep_dir)).to_pylist()}
    assert sorted(rows) == ["iwae_L1_M1_K3_s0", "vae_L1_M1_K1_s0"] and rows["iwae_L1_M1_K3_s0"]["epochs"] == 40
    kept = rows["vae_L1_M1_K1_s0"]
    assert (kept["evaluation_id"], kept["test_nll"]) == (before[0]["evaluation_id"], before[0]["test_nll"])
    assert [p.name for p in (sweep_dir.glob("vae_*/tb_evaluation/*"))] == [kept["evaluation_id"]]
    per_image = read_per_image(str(sweep_dir)).to_pandas()
    assert per_image.groupby("trial_name")["evaluation_id"].unique().map(list).to_dict() == {
        name: [row["evaluation_id"]] for name, row in rows.items()
    }
