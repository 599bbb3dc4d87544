import pytest
import torch

from iwae_model import build_model
from iwae_model.bench import bench_evaluation, bench_training, matmul_peak

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


def test_matmul_peak_is_a_rate_of_real_work():
    assert 1.0 < matmul_peak(CPU, 0.2) < 1e5

