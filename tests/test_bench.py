import math

import pytest
import torch

from iwae_model import TrainConfig, build_model
from iwae_model.bare_loop import BareIWAE
from iwae_model.bench import (
    bench_against_bare_loop,
    bench_ais,
    bench_evaluation,
    bench_training,
    fraction_of_peak,
    matmul_peak,
)
from iwae_model.data import binarize
from iwae_model.training import build_optimizer, build_surrogate, train_step

CPU = torch.device("cpu")


def test_training_figure_counts_forward_and_backward_multiply_adds():
    figure = bench_training("iwae_k5_L1", {"layers": 1, "objective": "iwae", "k": 5}, CPU, steps=20, peak=50.0)
    macs = build_model(1).multiply_adds(5)
    assert figure["images_per_s"] == pytest.approx(20 * figure["steps_per_s"], rel=1e-2)
    assert figure["gflops"] == pytest.approx(figure["images_per_s"] * 3 * 2 * macs / 1e9, rel=1e-2, abs=0.06)
    assert figure["fraction_of_peak"] == pytest.approx(figure["gflops"] / 50.0, abs=2e-3)


@pytest.mark.parametrize("layers", [1, 2])
def test_evaluation_figure_counts_the_first_encoder_once_per_image(layers):
    figure = bench_evaluation(layers, CPU, images=2, peak=50.0, k=100)
    macs = build_model(layers).multiply_adds(100)
    assert figure["name"] == f"nll_k100_L{layers}"
    assert figure["gflops"] == pytest.approx(figure["images_per_s"] * 2 * macs / 1e9, rel=1e-2, abs=0.06)
    assert figure["test_set_minutes"] == pytest.approx(10000 / figure["images_per_s"] / 60, rel=1e-2, abs=0.006)


@pytest.mark.parametrize("layers", [1, 2])
def test_ais_figure_scales_its_time_to_1000_distributions(layers):
    figure = bench_ais(layers, CPU, images=2, steps=3, chains=2)
    assert figure["name"] == f"ais_encoder_s3_c2_L{layers}" and figure["leapfrog"] == 10
    per_1000 = 1000 / 3 / figure["images_per_s"]
    assert figure["seconds_per_image_per_1000_steps"] == pytest.approx(per_1000, rel=1e-2, abs=0.06)


@pytest.mark.parametrize("seconds", [0.0, 0.2])
def test_matmul_peak_times_at_least_one_matmul_whatever_the_window(seconds):
    # A window of 0 s is shorter than any matmul on any CPU: the figure must still be measured.
    # The bounds only say "a real rate": 1 GFLOP/s to 100 TFLOP/s.
    assert 1.0 < matmul_peak(CPU, seconds) < 1e5


@pytest.mark.parametrize("peak", [0.0, -1.0, math.inf, math.nan])
def test_a_peak_that_is_not_a_rate_is_an_error_not_a_division(peak):
    with pytest.raises(ValueError, match="not a rate of real work"):
        fraction_of_peak(10.0, peak)
    assert fraction_of_peak(10.0, 40.0) == 0.25


@pytest.mark.parametrize("layers, objective, k", [(1, "vae", 1), (1, "iwae", 5), (2, "iwae", 5)])
def test_the_bare_loop_computes_the_library_step(layers, objective, k):
    # Same weights, same generator: the same binarization and noise draws, so the same loss
    # and gradients up to float32 rounding (the library keeps log 2 pi terms that cancel).
    config = TrainConfig(layers=layers, objective=objective, k=k)
    torch.manual_seed(0)
    model = config.build_model()
    bare = BareIWAE(layers, k, CPU, config)
    with torch.no_grad():
        for mine, theirs in zip(bare.params, model.parameters(), strict=True):
            mine.copy_(theirs)
    grey = torch.rand(20, 784, generator=torch.Generator().manual_seed(1))
    bare.step(grey, torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    x = binarize(grey, generator)
    params = model.encoder_parameters(), model.decoder_parameters()
    surrogate = build_surrogate(model, config.build_objective(), config.build_estimator())
    train_step(model, build_optimizer(model, config), surrogate, k, x, generator, params)
    for mine, theirs in zip(bare.params, model.parameters(), strict=True):
        scale = theirs.grad.abs().max()
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-3, atol=1e-5 * scale)


def test_the_bare_loop_figure_is_a_median_of_alternating_rounds():
    figure = bench_against_bare_loop(
        "iwae_k5_L1", {"layers": 1, "objective": "iwae", "k": 5}, CPU, rounds=3, seconds_per_round=0.05
    )
    assert figure["rounds"] == 3 and figure["steps_per_round"] >= 5
    low, high = figure["ratio_range"]
    assert 0 < low <= figure["ratio"] <= high
    assert figure["library_steps_per_s"] > 0 and figure["bare_steps_per_s"] > 0
