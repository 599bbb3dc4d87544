"""End-to-end sweeps on a real local Ray cluster, with real MNIST, Parquet and TensorBoard files."""

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from conftest import (
    TINY_PASSES,
    TINY_SPACE,
    assert_complete_history,
    assert_same_evaluations,
    tiny_space,
    trial_dirs,
)
from google.protobuf import json_format
from pyarrow import fs as pafs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from test_live_view import assert_each_trial_and_no_noise

from iwae_model.checkpoint import load_checkpoint
from sweep.cluster import LOOPBACK_SWITCH, ClusterError, check_gpus
from sweep.columns import RESULTS
from sweep.evaluate import main as evaluate_main
from sweep.plan import drawn_trials, dry_run, plan_sweep
from sweep.query import main as query_main
from sweep.results import (
    PER_IMAGE_FILE,
    PER_IMAGE_SCHEMA,
    RESULTS_FILE,
    ResultsError,
    read_evaluated,
    read_per_image,
    read_results,
    write_evaluated,
)
from sweep.run import main as run_main
from sweep.run import run_sweep
from sweep.space import SpaceError, load_space, parse_space

PASSES = TINY_PASSES


TINY = TINY_SPACE


@pytest.fixture
def finished_sweep(tiny_sweep):
    return tiny_sweep.folder, tiny_sweep.results, tiny_sweep.rows


def test_in_a_log_file_the_live_view_has_a_line_per_trial_and_pass(tiny_sweep):
    # The shared tiny sweep ran as `python -m sweep.run` with its output to a pipe (a terminal's
    # view: test_live_view).
    assert_each_trial_and_no_noise(tiny_sweep.out, tiny_sweep.err, terminal=False)


def test_parquet_has_one_typed_finite_row_per_trial(finished_sweep):
    sweep_dir, path, rows = finished_sweep
    assert path == sweep_dir / "results" / "results.parquet"
    table = read_results(str(sweep_dir))
    assert table.schema.equals(RESULTS.arrow(), check_metadata=True)
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
    # Every trial's, as its folder (<label>_<trial id>) names it.
    assert sorted(evaluated) == sorted("_".join(p.name.split("_")[-2:]) for p in trial_dirs(sweep_dir))
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


CURVE_GROUPS = ("bound", "likelihood", "active_units", "optimizer", "speed", "snr", "evaluation")


def test_tensorboard_has_one_run_per_trial_with_its_curves_images_and_evaluation(finished_sweep):
    # The sweep folder as `tensorboard --logdir` reads it: a run per trial, named by it, nothing else.
    sweep_dir, _, _ = finished_sweep
    runs = EventMultiplexer(size_guidance={"images": 0, "scalars": 0})
    runs.AddRunsFromDirectory(str(sweep_dir))
    runs.Reload()
    assert sorted(runs.Runs()) == [trial.name for trial in trial_dirs(sweep_dir)]
    for trial in trial_dirs(sweep_dir):
        tags = runs.Runs()[trial.name]["scalars"]
        assert {tag.split("/")[0] for tag in tags} <= set(CURVE_GROUPS), tags  # none of Ray's bookkeeping
        for tag in ("bound/train", "bound/test", "bound/valid", "optimizer/lr", "active_units/all", "active_units/L1"):
            assert [v.step for v in runs.Scalars(trial.name, tag)] == list(range(1, PASSES + 1)), tag
        for tag in ("samples", "reconstructions"):
            shots = runs.Images(trial.name, tag)
            # Ten grids per trial at most; a 3-pass trial gets one every pass.
            assert [shot.step for shot in shots] == list(range(1, PASSES + 1)), tag
            assert shots[-1].width == shots[-1].height == 8 * 28


def hparams_sessions(folder: Path) -> dict[str, tuple[dict, list[str]]]:
    """The HParams plugin's sessions under `folder`, read from the event files as TensorBoard's
    plugin reads them (its data: the `hparams` plugin's summaries), by run: (the session's
    settings, the experiment's settings marked as varying)."""
    runs = EventMultiplexer()
    runs.AddRunsFromDirectory(str(folder))
    runs.Reload()
    sessions = {}
    for run, tags in runs.PluginRunToTagToContent("hparams").items():
        data = {tag: HParamsPluginData.FromString(content) for tag, content in tags.items()}
        hparams = data["_hparams_/session_start_info"].session_start_info.hparams
        varying = [info.name for info in data["_hparams_/experiment"].experiment.hparam_infos if info.differs]
        sessions[run] = ({key: json_format.MessageToDict(value) for key, value in hparams.items()}, varying)
    return sessions


def test_tensorboard_hparams_has_one_row_per_trial_in_its_run_with_its_evaluated_figures(finished_sweep):
    sweep_dir, _, rows = finished_sweep
    sessions = hparams_sessions(sweep_dir)
    runs = {row["trial_name"]: f"{row['trial_name']}_{row['trial_id']}" for row in rows}
    assert sorted(sessions) == sorted(runs.values())  # in the trials' own runs; Ray's rows left out
    for row in rows:
        session, varying = sessions[runs[row["trial_name"]]]
        assert session["objective"] == row["objective"] and session["k"] == row["k"] and "lr" in session
        assert sorted(varying) == ["k", "objective"]  # what TensorBoard shows first
        scalars = EventAccumulator(str(sweep_dir / runs[row["trial_name"]]))
        scalars.Reload()
        assert scalars.Scalars("evaluation/test_nll")[-1].value == pytest.approx(row["test_nll"], rel=1e-6)
        assert math.isfinite(scalars.Scalars("bound/valid")[-1].value)


def query(capsys, *args: str) -> tuple[int, str, str]:
    """`python -m sweep.query ARGS` run in this process (its imports paid once): its exit status,
    stdout and stderr."""
    capsys.readouterr()
    code, message = 0, ""
    try:
        query_main(list(args))
    except SystemExit as stopped:
        code, message = (1, f"{stopped.code}\n") if isinstance(stopped.code, str) else (stopped.code, "")
    out, err = capsys.readouterr()
    return code, out, err + message


def test_query_prints_the_table_from_parquet(finished_sweep, tmp_path, capsys):
    sweep_dir, _, _ = finished_sweep
    table = subprocess.run([sys.executable, "-m", "sweep.query", str(sweep_dir)], capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    assert "| layers | M | K | VAE | IWAE |" in table.stdout and "not comparable to the papers" in table.stdout
    assert "[paper 86.76" in table.stdout  # VAE, 1 layer, k=1 from Burda's Table 1
    code, out, err = query(
        capsys, str(sweep_dir), "--format", "json", "--where", "objective=iwae", "--plot", str(tmp_path / "nll.png")
    )
    assert code == 0, err
    assert [(r["variant"], r["k"]) for r in json.loads(out)] == [("IWAE", 3)]
    assert (tmp_path / "nll.png").stat().st_size > 10_000
    code, _, err = query(capsys, str(sweep_dir), "--where", "colour=red")
    assert code == 1 and "colour=red" in err
    code, _, err = query(capsys, str(sweep_dir), "--importance")
    assert code == 1 and "not a search's" in err


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
        scalars = EventAccumulator(str(trial), size_guidance={"histograms": 0})
        scalars.Reload()
        for tag in ("snr/encoder_mean", "snr/encoder_median", "snr/decoder_mean", "snr/decoder_median"):
            assert [v.step for v in scalars.Scalars(tag)] == [PASSES], tag
        record = next(r for r in records if trial.name.endswith(r["trial_id"]))
        for name in ("test_nll", "ess_mean", "pareto_k_above_0_7"):
            (event,) = scalars.Scalars(f"evaluation/{name}")
            assert event.step == record["epochs"] and event.value == pytest.approx(record[name], rel=1e-6), name
        (histogram,) = scalars.Histograms("evaluation/ess_per_image")
        assert histogram.histogram_value.num == 40 and histogram.histogram_value.max <= 50


def test_query_compares_two_checkpoints_paired_and_against_a_baseline(finished_sweep, tmp_path, capsys):
    sweep_dir, _, _ = finished_sweep
    records = {r["trial_name"]: r for r in read_results(str(sweep_dir)).to_pylist()}
    code, out, err = query(capsys, str(sweep_dir), "--compare", "iwae_L1_M1_K3_s0", "objective=vae,k=1")
    assert code == 0, err
    expected = records["iwae_L1_M1_K3_s0"]["test_nll"] - records["vae_L1_M1_K1_s0"]["test_nll"]
    assert f"A - B = {expected:+.3f} nats over the same 40 test images (k=50); common noise: yes" in out
    paired = float(out.split("paired SE")[1].split()[0])
    unpaired = float(out.split("unpaired SE")[1].split()[0])
    assert 0 < paired < unpaired  # the same images: the images' own spread cancels
    code, table, err = query(
        capsys, str(sweep_dir), "--baseline", "vae_L1_M1_K1_s0", "--snr-plot", str(tmp_path / "snr.png")
    )
    assert code == 0, err
    assert "Δ +0.000 ± 0.000" in table and f"Δ {expected:+.3f} ± {paired:.3f}" in table
    assert "Δ: mean per-image NLL difference to vae_L1_M1_K1_s0" in table
    assert (tmp_path / "snr.png").stat().st_size > 10_000
    for args, words in (
        (["--compare", "nope", "vae_L1_M1_K1_s0"], "--compare A 'nope': no trial of that label"),
        (["--compare", "layers=1", "vae_L1_M1_K1_s0"], "matches 2 checkpoints"),
        (["--baseline", "colour=red"], "'colour' is not a column"),
    ):
        code, _, err = query(capsys, str(sweep_dir), *args)
        assert code == 1 and words in err and "Traceback" not in err, err


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


def test_an_existing_sweep_needs_resume_and_resume_reruns_nothing(finished_sweep, local_ray, mnist_dir):
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
        SpaceError, match=r"started from \S+/space\.yaml \(2 trials\); other.yaml defines other trials \(1 trials\)"
    ):
        run_sweep(other, str(sweep_dir.parent), str(mnist_dir), resume=True)


@pytest.mark.parametrize(
    "space", sorted(path.stem for path in (Path(__file__).parents[1] / "search_spaces").glob("*.yaml"))
)
def test_dry_run_plans_every_shipped_space_and_writes_nothing(tmp_path, space, capsys):
    run_main(["--space", space, "--dry-run", "--storage", str(tmp_path / "store")])  # in-process: 8 times
    out = capsys.readouterr().out
    loaded = load_space(space)
    for trial in [*drawn_trials(loaded), *loaded.continued]:  # a search: the values drawn for the estimate
        assert trial.label() in out
    assert "Estimated wall time:" in out and "An estimate, calibrated" in out
    assert ("then AIS (" in out) == (loaded.evaluation.ais is not None)  # AIS is counted where it runs
    assert not (tmp_path / "store").exists()


def test_dry_run_counts_the_optimizer_steps_each_trial_takes(finished_sweep):
    # The estimate is steps x calibrated seconds per step; the seconds are timing (measured by
    # `--dry-run` itself, not asserted here: a loaded CI machine makes any time window flaky), the
    # steps are exact and must be the ones the trial really took.
    _, _, rows = finished_sweep
    plan = plan_sweep(tiny_space("tiny"), torch.device("cpu"), concurrent=2, eval_threads=2)
    planned = {t.label: t.steps for t in plan.trials}
    assert sorted(planned) == sorted(row["trial_name"] for row in rows)
    for row in rows:
        assert load_checkpoint(row["checkpoint_uri"])["step"] == planned[row["trial_name"]], row["trial_name"]


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
    # `python -m sweep.evaluate` in this process, on this module's Ray (a second Ray costs more than
    # the evaluation): it reads the two-stage sweep from its files, never from this driver's memory.
    evaluate_main([str(tmp_path / "continued"), "--k", "20", "--images", "10"])
    again = read_results(str(tmp_path / "continued")).to_pylist()
    assert len(again) == 3 and {row["eval_k"] for row in again} == {20}  # all three evaluated anew
    unknown = replace(
        parse_space({**continued, "name": "unknown", "experiments": [{"objective": "vae", "k": 7}]}, "<unknown>"),
        init_from_sweep=str(parent_dir),
    )
    with pytest.raises(SpaceError, match="no finished trial labelled vae_L1_M1_K7_s0 to continue"):
        run_sweep(unknown, str(tmp_path), str(mnist_dir))
    # The command in this process: a user's error ends it as exit_with does (status 1, the message on
    # stderr); any other exception would fail this test, as a traceback would.
    with pytest.raises(SystemExit) as refused:
        run_main(["--space", "quick", "--init-from-sweep", str(parent_dir), "--storage", str(tmp_path / "cli")])
    assert str(refused.value.code).startswith("error: ") and "has no `continue` section" in str(refused.value.code)


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
