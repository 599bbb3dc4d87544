"""Importance-sampling health of the k-sample estimate: ESS and PSIS k̂, checked against ArviZ's
implementation (arviz-stats, a test dependency only) and computed in chunks exactly as on all
log-weights at once."""

import math

import numpy as np
import pytest
import torch
from arviz_stats.base import array_stats
from conftest import FLOAT32_REORDER_RTOL, random_binary

from iwae_model.importance import effective_sample_size, pareto_k_hat, pareto_tail_size
from iwae_model.likelihood import evaluation_noise, importance_sampling, log_likelihood
from iwae_model.models import build_model


def arviz_k_hat(log_w: np.ndarray) -> float:
    # arviz-stats' psislw takes log-likelihoods, LOO-style: the log-weights are their negatives.
    return float(array_stats.psislw(-log_w)[1])


def ours(log_w: np.ndarray) -> float:
    k = len(log_w)
    largest = torch.tensor(log_w)[:, None].topk(min(k, pareto_tail_size(k) + 1), dim=0).values
    return float(pareto_k_hat(largest, k)[0])


@pytest.mark.parametrize("k", [25, 100, 300, 5000])
@pytest.mark.parametrize("family", ["normal", "student-t 3", "pareto 0.5", "pareto 0.9", "lognormal wide"])
def test_pareto_k_hat_is_arvizs(k, family):
    rng = np.random.default_rng(k)
    log_w = {
        "normal": lambda: rng.normal(size=k),
        "student-t 3": lambda: 2 * rng.standard_t(3, size=k),
        "pareto 0.5": lambda: np.log1p(rng.pareto(1 / 0.5, size=k)),
        "pareto 0.9": lambda: np.log1p(rng.pareto(1 / 0.9, size=k)),
        "lognormal wide": lambda: 5 * rng.normal(size=k) - 300,  # far below 0: the fit must be scale-free
    }[family]()
    assert ours(log_w) == pytest.approx(arviz_k_hat(log_w), rel=1e-9, abs=1e-12)


def test_pareto_k_hat_recovers_a_known_tail_and_flags_it():
    rng = np.random.default_rng(0)
    light = ours(rng.normal(size=5000))  # log-normal weights with sigma 1: all moments finite
    heavy = ours(np.log1p(rng.pareto(1 / 0.9, size=5000)))  # a generalised Pareto tail with shape 0.9
    assert light < 0.7 < heavy and heavy == pytest.approx(0.9, abs=0.15)


def test_pareto_k_hat_is_nan_below_five_tail_weights():
    assert pareto_tail_size(24) == 4 and pareto_tail_size(25) == 5 and pareto_tail_size(5000) == 212
    assert math.isnan(ours(np.random.default_rng(0).normal(size=24)))


def test_ess_is_the_inverse_sum_of_squared_normalised_weights():
    log_w = torch.randn(1000, 3, dtype=torch.float64) * torch.tensor([0.0, 1.0, 30.0])
    normalised = torch.softmax(log_w, dim=0)
    ess = effective_sample_size(torch.logsumexp(log_w, 0), torch.logsumexp(2 * log_w, 0))
    assert torch.allclose(ess, 1 / normalised.square().sum(0), rtol=1e-12)
    assert ess[0] == pytest.approx(1000) and 1 <= ess[2] < 2  # equal weights; one weight dominating


@pytest.mark.parametrize("layers", [1, 2])
def test_chunked_diagnostics_equal_those_of_all_log_weights_at_once(layers):
    # The evaluation keeps only running summaries; the reference sees all k log-weights of the
    # same noise. Equal up to float32 rounding of the log-weights (chunks are GEMMs of another shape).
    torch.manual_seed(0)
    model = build_model(layers).eval()
    x, k = random_binary(6, 784), 1000
    estimate = importance_sampling(model, x, k, image_batch=6, chunk_rows=6 * 97)
    with torch.no_grad():
        noise = evaluation_noise(model, k, 0, 6)
        log_w = model.log_weights(x, noise=noise).double()
    reference_ll = torch.logsumexp(log_w, 0) - math.log(k)
    reference_ess = 1 / torch.softmax(log_w, 0).square().sum(0)
    reference_k = torch.tensor([arviz_k_hat(column) for column in log_w.T.numpy()], dtype=torch.float64)
    assert torch.allclose(estimate.log_likelihood, reference_ll, rtol=FLOAT32_REORDER_RTOL, atol=0)
    # ESS and k̂ are ratios of weights: a relative change of a log-weight by r moves a weight by
    # |log w| * r; 1e-3 relative leaves room for that while a wrong tail or a lost chunk moves them by far more.
    assert torch.allclose(estimate.ess, reference_ess, rtol=1e-3)
    assert torch.allclose(estimate.pareto_k, reference_k, rtol=1e-3, atol=1e-3)
    assert torch.equal(log_likelihood(model, x, k, image_batch=6, chunk_rows=6 * 97), estimate.log_likelihood)
