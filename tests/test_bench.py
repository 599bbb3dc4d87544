import math

import pytest
import torch

from iwae_model import build_model
from iwae_model.bench import bench_evaluation, bench_training, fraction_of_peak, matmul_peak

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
