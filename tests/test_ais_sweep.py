"""AIS beside the k-sample IS estimate in a sweep (`evaluation.ais`): one tiny sweep with AIS,
then resumed, read back through Parquet, TensorBoard and the query; settings that cannot run
refused by the space loader before anything starts."""

import json
import math

import numpy as np
import pytest
import ray
import torch
import yaml
from conftest import TINY_SPACE
from ray import tune
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from iwae_model import ais_log_likelihood
from iwae_model.ais import LEAPFROG_STEPS
from iwae_model.checkpoint import CHECKPOINT_NAME, load_model
from iwae_model.datasets import load_dataset
from sweep.evaluation_jobs import same_evaluation
from sweep.query import main as query_main
from sweep.results import read_per_image, read_results
from sweep.run import run_sweep
from sweep.space import SpaceError, load_space, parse_space

AIS = {"steps": 4, "images": 8, "chains": 3}
SPACE = {
    **TINY_SPACE,
    "name": "ais",
    "experiments": [{"objective": "iwae", "k": 3}],
    "training": {**TINY_SPACE["training"], "snr_every": 0},
    "evaluation": {**TINY_SPACE["evaluation"], "ais": AIS},  # IS: k=50 on 40 images
}


@pytest.fixture(scope="module")
def ais_sweep(mnist_dir, tmp_path_factory):
    """(sweep folder, results row, per-image rows) after the sweep, and the row after a resume."""
    storage = tmp_path_factory.mktemp("storage")
    space = parse_space(SPACE, "<ais>")
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        _, (row,), _ = run_sweep(space, str(storage), str(mnist_dir))
        per_image = read_per_image(str(storage / "ais")).to_pandas()
        _, (resumed,), _ = run_sweep(space, str(storage), str(mnist_dir), resume=True)
    finally:
        ray.shutdown()
    return storage / "ais", row, per_image, resumed


def test_ais_reaches_parquet_beside_is_on_the_same_images(ais_sweep, mnist_dir):
    sweep_dir, row, per_image, _ = ais_sweep
    (written,) = read_results(str(sweep_dir)).to_pylist()
    assert written == row
    settings = [row[f"ais_{key}"] for key in ("steps", "chains", "start", "leapfrog", "images")]
    assert settings == [4, 3, "encoder", LEAPFROG_STEPS, 8] and row["eval_images"] == 40
    assert 80 < row["ais_nll"] < 400 and row["ais_nll_se"] > 0 and row["ais_seconds"] > 0
    assert 0 < row["ais_acceptance"] <= 1 and row["ais_log_weight_sd_median"] >= 0
    images = per_image.sort_values("image")
    assert images["image"].tolist() == list(range(40))
    ais_nll, is_nll = images["ais_nll"].to_numpy(), images["nll"].to_numpy()
    assert np.isfinite(ais_nll[:8]).all() and np.isnan(ais_nll[8:]).all()  # null beyond ais.images
    # The paired figures are those of the first 8 images' per-image values, IS's from the same evaluation.
    assert ais_nll[:8].mean() == pytest.approx(row["ais_nll"], rel=1e-12)
    assert is_nll[:8].mean() == pytest.approx(row["ais_is_nll"], rel=1e-12)
    differences = is_nll[:8] - ais_nll[:8]
    assert differences.mean() == pytest.approx(row["ais_minus_is"], rel=1e-9)
    assert differences.std(ddof=1) / math.sqrt(8) == pytest.approx(row["ais_minus_is_se"], rel=1e-9)
    # The same estimates as AIS run here on the checkpoint's model and the first 8 test images
    # (up to float32 rounding: the task's thread count splits the matrix products otherwise).
    model, config, _ = load_model(f"{row['checkpoint_uri']}/{CHECKPOINT_NAME}", torch.device("cpu"))
    x = load_dataset(config.dataset, mnist_dir, "cpu", config.binarization, download=False).binarized_once("test")[:8]
    here = -ais_log_likelihood(model, x, steps=4, chains=3).numpy()
    np.testing.assert_allclose(ais_nll[:8], here, rtol=1e-4)


def test_ais_reaches_tensorboard_and_hparams(ais_sweep):
    sweep_dir, row, _, _ = ais_sweep
    (trial,) = sweep_dir.glob("iwae_L*")
    events = EventAccumulator(str(trial), size_guidance={"histograms": 0})
    events.Reload()
    for name in ("ais_nll", "ais_is_nll", "ais_minus_is", "ais_acceptance", "test_nll"):
        (event,) = events.Scalars(f"evaluation/{name}")
        assert event.step == row["epochs"] and event.value == pytest.approx(row[name], rel=1e-6), name
    (histogram,) = events.Histograms("evaluation/ais_nll_per_image")
    assert histogram.histogram_value.num == 8  # the images AIS ran on, not the 32 nulls
    experiment = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/experiment"]).experiment
    metrics = [info.name.tag for info in experiment.metric_infos]
    assert {"evaluation/ais_minus_is", "evaluation/pareto_k_above_0_7"} <= set(metrics)  # the HParams columns


def test_the_query_shows_ais_minus_is_and_the_share_of_doubtful_images(ais_sweep, capsys):
    sweep_dir, row, _, _ = ais_sweep
    query_main([str(sweep_dir)])
    table = capsys.readouterr().out
    cell = f"k̂>0.7 {row['pareto_k_above_0_7']:.0%} AIS−IS {row['ais_minus_is']:+.2f} ± {row['ais_minus_is_se']:.2f}"
    assert cell in table, table
    assert "k̂>0.7: the share of test images" in table and "paired on the same first 8 test images" in table
    query_main([str(sweep_dir), "--format", "json"])
    (summary,) = json.loads(capsys.readouterr().out)
    for name in ("ais_minus_is", "ais_minus_is_se", "ais_images", "pareto_k_above_0_7"):
        assert summary[name] == pytest.approx(row[name], rel=1e-9), name  # JSON: 10 digits


def test_a_resume_keeps_the_ais_rows_and_other_ais_settings_evaluate_anew(ais_sweep):
    sweep_dir, row, per_image, resumed = ais_sweep
    assert resumed == row  # the same evaluation, AIS included: nothing evaluated again
    assert read_per_image(str(sweep_dir)).to_pandas().equals(per_image)
    assert len(list(sweep_dir.glob("iwae_L*/events.out.tfevents.*.evaluation"))) == 1  # written once
    # What a resume compares: the row's AIS settings against the space's (one row is one
    # evaluation, IS and AIS under one id, so other AIS settings evaluate the checkpoint anew).
    checkpoint = tune.Checkpoint(row["checkpoint_uri"])
    for ais, same in (
        (AIS, True),
        ({**AIS, "steps": 5}, False),
        ({**AIS, "images": 16}, False),
        ({**AIS, "start": "prior"}, False),
        (None, False),
    ):
        space = parse_space({**SPACE, "evaluation": {**SPACE["evaluation"], "ais": ais}}, "<ais>")
        assert same_evaluation(row, checkpoint, space) is same, ais


@pytest.mark.parametrize(
    ("ais", "is_images", "words"),
    [
        ({"steps": 0}, 40, ["evaluation.ais.steps: 0", "at least 1", "annealing distributions"]),
        ({"steps": 10, "chains": 0}, 40, ["evaluation.ais.chains: 0", "at least 1", "16"]),
        ({"steps": 10, "images": 20000}, None, ["evaluation.ais.images: 20000", "10,000 images", "at most 10000"]),
        ({"steps": 10, "images": 50}, 40, ["evaluation.ais.images: 50", "the 40 test images IS evaluates", "raise"]),
        ({"steps": 10, "start": "posterior"}, 40, ["evaluation.ais.start: 'posterior'", "encoder, prior"]),
        ({"images": 8}, 40, ["evaluation.ais.steps: missing", "steps: 1000"]),
        ({"steps": 10, "chain": 16}, 40, ["evaluation.ais.chain: unknown key", "chains"]),
    ],
)
def test_ais_settings_that_cannot_run_are_refused_by_the_loader(tmp_path, ais, is_images, words):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**SPACE, "evaluation": {"k": 50, "images": is_images, "ais": ais}}))
    with pytest.raises(SpaceError) as refused:
        load_space(path)
    assert str(refused.value).startswith(f"{path}: ") and all(w in str(refused.value) for w in words), refused.value
