import math

import numpy as np
import pytest
import torch
from conftest import random_binary
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from iwae_model import TrainConfig
from iwae_model.likelihood import log_likelihood
from iwae_model.models import build_model
from iwae_model.objectives import (
    CIWAE,
    ELBO,
    IWAE,
    MIWAE,
    PIWAE,
    RWS,
    VR,
    build_estimator,
    build_objective,
)

# ---- definitions, exactly ------------------------------------------------------------------


def test_bounds_match_their_definitions_in_float64():
    log_w = torch.randn(12, 7, dtype=torch.float64) * 3
    w = log_w.exp()
    assert torch.allclose(IWAE(12).bound(log_w), (w.mean(0)).log())
    assert torch.allclose(ELBO(12).bound(log_w), log_w.mean(0))
    groups = w.reshape(3, 4, 7)
    assert torch.allclose(MIWAE(3, 4).bound(log_w), groups.mean(1).log().mean(0))
    assert torch.allclose(CIWAE(0.3, 12).bound(log_w), 0.3 * log_w.mean(0) + 0.7 * w.mean(0).log())
    assert torch.allclose(PIWAE(3, 4).bound(log_w), IWAE(12).bound(log_w))
    assert torch.allclose(MIWAE(1, 12).bound(log_w), IWAE(12).bound(log_w))
    assert torch.allclose(MIWAE(12, 1).bound(log_w), ELBO(12).bound(log_w))
    assert torch.allclose(CIWAE(0.0, 12).bound(log_w), IWAE(12).bound(log_w))
    assert torch.allclose(CIWAE(1.0, 12).bound(log_w), ELBO(12).bound(log_w))


def test_build_objective_names_and_errors():
    assert isinstance(build_objective("vae", 5), ELBO) and build_objective("vae", 5).num_samples == 5
    assert build_objective("miwae", 16, m=4).num_samples == 64
    assert build_objective("piwae", 8, m=8).num_samples == 64
    with pytest.raises(ValueError, match="objective='nope'"):
        build_objective("nope", 5)
    with pytest.raises(ValueError, match="use objective 'miwae'"):
        build_objective("iwae", 5, m=2)
    with pytest.raises(ValueError, match="beta=1.5"):
        build_objective("ciwae", 5, beta=1.5)
    with pytest.raises(ValueError, match="needs 10"):
        IWAE(10).bound(torch.zeros(5, 3))


def test_dreg_refuses_two_layers_with_a_clear_error():
    with pytest.raises(ValueError, match="estimator='dreg' with layers=2.*Bauer & Mnih"):
        build_estimator("dreg", 2)
    assert build_estimator("stl", 2).sampling_options == {"stop_q_params": True}
    with pytest.raises(ValueError, match="estimator='score'"):
        build_estimator("score", 1)


# ---- ordering and float32 stability ----------------------------------------------------------

log_weight_arrays = arrays(
    np.float32,
    (24, 3),
    elements=st.floats(-60, 60, width=32),
).map(lambda a: torch.from_numpy(a))


@settings(max_examples=200, deadline=None)
@given(log_w=log_weight_arrays, offset=st.sampled_from([0.0, -5000.0, 3000.0]))
def test_elbo_le_miwae_le_iwae_for_the_same_samples(log_w, offset):
    # Jensen's inequality holds sample by sample, not only in expectation.
    log_w = log_w + offset
    elbo, miwae, iwae = ELBO(24).bound(log_w), MIWAE(4, 6).bound(log_w), IWAE(24).bound(log_w)
    tol = 1e-3 * (1 + abs(offset))
    assert torch.all(elbo <= miwae + tol) and torch.all(miwae <= iwae + tol)


@settings(max_examples=100, deadline=None)
@given(log_w=log_weight_arrays)
def test_float32_is_exact_at_log_weights_near_minus_5000(log_w):
    shifted = log_w - 5000.0
    for objective in (IWAE(24), MIWAE(4, 6), ELBO(24), CIWAE(0.5, 24), PIWAE(4, 6)):
        value32 = objective.bound(shifted)
        value64 = objective.bound(shifted.double())
        assert torch.isfinite(value32).all()
        # float32 spacing at 5000 is 5e-4: the result must be as exact as the format allows.
        assert torch.allclose(value32.double(), value64, atol=2e-3, rtol=0)
        coefficients = objective.dreg_coefficients(shifted)
        assert torch.isfinite(coefficients).all()


def test_gradients_are_finite_at_extreme_log_weights():
    log_w = (torch.randn(50, 4, generator=torch.Generator().manual_seed(0)) * 200 - 5000).requires_grad_()
    IWAE(50).bound(log_w).sum().backward()
    assert torch.isfinite(log_w.grad).all()
    # Softmax weights sum to one, up to float32 rounding at |log w| ~ 5000: half an ulp there is
    # 2.4e-4, by which each log w - max log w may be off.
    assert torch.allclose(log_w.grad.sum(0), torch.ones(4), rtol=0, atol=1e-3)


def test_bounds_increase_with_k_in_expectation():
    torch.manual_seed(0)
    model = build_model(1, latent_dims=[4], hidden_dims=[32], x_dim=20)
    x = random_binary(2000, 20)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        means = {}
        for name, objective in [("elbo", ELBO(5)), ("iwae1", IWAE(1)), ("iwae5", IWAE(5)), ("iwae50", IWAE(50))]:
            means[name] = objective.bound(model.log_weights(x, objective.num_samples, g)).mean().item()
    assert means["elbo"] < means["iwae5"] < means["iwae50"]
    assert abs(means["elbo"] - means["iwae1"]) < 0.2  # the same bound: equal up to Monte-Carlo noise


# ---- exact likelihood by quadrature ----------------------------------------------------------


def exact_log_px_one_layer(model, x, half_width=7.0, points=401):
    """log p(x) = log ∫ p(x|h) N(h; 0, I) dh over a 2-D grid (trapezoid-free Riemann sum, the
    integrand is smooth and negligible at the edges)."""
    grid = torch.linspace(-half_width, half_width, points, dtype=torch.float64)
    h = torch.cartesian_prod(grid, grid)  # [P, 2]
    cell = math.log((grid[1] - grid[0]).item()) * 2
    with torch.no_grad():
        log_prior = -0.5 * h.square().sum(-1) - math.log(2 * math.pi)
        log_lik = model.decoder.log_prob(x.double(), h[:, None, :].expand(-1, len(x), -1))  # [P, B]
        return torch.logsumexp(log_lik + log_prior[:, None], 0) + cell


def exact_log_px_two_layers(model, x, half_width=7.0, points=401):
    """Two scalar latents h1, h2: log ∫∫ p(x|h1) p(h1|h2) p(h2) dh1 dh2 on a 2-D grid."""
    grid = torch.linspace(-half_width, half_width, points, dtype=torch.float64)
    h1, h2 = (g.reshape(-1, 1) for g in torch.cartesian_prod(grid, grid).unbind(-1))
    cell = math.log((grid[1] - grid[0]).item()) * 2
    with torch.no_grad():
        mean, log_std = model.priors[0](h2)
        log_p_h1 = (-0.5 * ((h1 - mean) / log_std.exp()).square() - log_std).sum(-1) - 0.5 * math.log(2 * math.pi)
        log_p_h2 = -0.5 * h2.square().sum(-1) - 0.5 * math.log(2 * math.pi)
        log_lik = model.decoder.log_prob(x.double(), h1[:, None, :].expand(-1, len(x), -1))
        return torch.logsumexp(log_lik + (log_p_h1 + log_p_h2)[:, None], 0) + cell


def fit_encoder(model, x, steps=300):
    """Fit q to these images (ELBO, encoder only) so that 5000 importance samples suffice: with
    a random q the estimate's error is dominated by a poor proposal, not by the code."""
    optimizer = torch.optim.Adam(model.encoder_parameters(), lr=0.02)
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        optimizer.zero_grad()
        (-ELBO(8).bound(model.log_weights(x, 8, g)).sum()).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("layers", [1, 2])
def test_iwae_5000_matches_the_exact_likelihood(layers):
    torch.manual_seed(3)
    if layers == 1:
        model = build_model(1, latent_dims=[2], hidden_dims=[16], x_dim=12)
        exact_fn = exact_log_px_one_layer
    else:
        model = build_model(2, latent_dims=[1, 1], hidden_dims=[16, 8], x_dim=12)
        exact_fn = exact_log_px_two_layers
    model = model.double()
    x = random_binary(20, 12, seed=5).double()
    fit_encoder(model, x)
    estimate = log_likelihood(model, x, k=5000)
    exact = exact_fn(model, x)
    assert estimate.dtype == torch.float64
    # The estimator is consistent and its downward bias is O(1/k): with q fitted, each image's
    # estimate is within a few hundredths of a nat of the integral (a missing log k or log 2pi
    # would be off by nats).
    error = estimate - exact
    assert error.abs().max() < 0.1, error
    assert error.mean().abs() < 0.02, error


# ---- gradient estimators -------------------------------------------------------------------


def encoder_gradient_samples(model, objective, estimator_name, x, groups, generator):
    """`groups` independent estimates of the expected encoder gradient (each the mean over
    the batch of replicated images), flattened."""
    estimator = build_estimator(estimator_name, model.num_layers)
    params = model.encoder_parameters()
    samples = []
    for _ in range(groups):
        model.zero_grad(set_to_none=True)
        log_w = model.log_weights(x, objective.num_samples, generator, **estimator.sampling_options)
        objective.surrogate(log_w, estimator_name).backward(params, model.decoder_parameters())
        samples.append(torch.cat([p.grad.flatten() for p in params]) / len(x))
    return torch.stack(samples)


def z_scores(a, b):
    """Per-coordinate z-score of the difference of two Monte-Carlo means, over the coordinates
    that vary (weights from always-zero pixels have exactly zero gradient under both)."""
    se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
    varying = se > 0
    assert varying.sum() > 50
    return (a.mean(0) - b.mean(0))[varying] / se[varying]


@pytest.fixture(scope="module")
def small_model_and_x():
    torch.manual_seed(11)
    model = build_model(1, latent_dims=[2], hidden_dims=[8], x_dim=10).double()
    x = random_binary(1, 10, seed=2).double().expand(1000, -1)  # one image, replicated
    return model, x


def test_dreg_is_unbiased_and_stl_is_biased_for_k_greater_than_one(small_model_and_x):
    model, x = small_model_and_x
    objective = IWAE(8)
    g = torch.Generator().manual_seed(0)
    reparam = encoder_gradient_samples(model, objective, "reparam", x, 40, g)
    dreg = encoder_gradient_samples(model, objective, "dreg", x, 40, g)
    stl = encoder_gradient_samples(model, objective, "stl", x, 40, g)
    z_dreg, z_stl = z_scores(dreg, reparam), z_scores(stl, reparam)
    # DReG: every coordinate agrees with the standard estimator within Monte-Carlo error.
    assert z_dreg.abs().max() < 4.5, z_dreg
    # STL: some coordinates are off by many standard errors (its bias for K > 1).
    assert z_stl.abs().max() > 8, z_stl
    # DReG's point is lower variance than the standard estimator.
    assert dreg.var(0).sum() < reparam.var(0).sum()


def test_stl_is_unbiased_for_k_equal_one(small_model_and_x):
    model, x = small_model_and_x
    g = torch.Generator().manual_seed(1)
    reparam = encoder_gradient_samples(model, IWAE(1), "reparam", x, 40, g)
    stl = encoder_gradient_samples(model, IWAE(1), "stl", x, 40, g)
    assert z_scores(stl, reparam).abs().max() < 4.5


def test_decoder_gradient_is_the_exact_gradient_under_every_estimator(small_model_and_x):
    model, x = small_model_and_x
    x = x[:50]
    grads = {}
    for name in ("reparam", "stl", "dreg"):
        estimator = build_estimator(name, 1)
        model.zero_grad(set_to_none=True)
        log_w = model.log_weights(x, 8, torch.Generator().manual_seed(0), **estimator.sampling_options)
        IWAE(8).surrogate(log_w, name).backward(model.encoder_parameters(), model.decoder_parameters())
        grads[name] = torch.cat([p.grad.flatten() for p in model.decoder_parameters()])
    assert torch.allclose(grads["reparam"], grads["stl"]) and torch.allclose(grads["reparam"], grads["dreg"])


def test_piwae_trains_encoder_on_miwae_and_decoder_on_iwae_mk(small_model_and_x):
    model, x = small_model_and_x
    x = x[:50]

    def grads(objective):
        model.zero_grad(set_to_none=True)
        log_w = model.log_weights(x, 12, torch.Generator().manual_seed(0))
        objective.surrogate(log_w, "reparam").backward(model.encoder_parameters(), model.decoder_parameters())
        return (
            torch.cat([p.grad.flatten() for p in model.encoder_parameters()]),
            torch.cat([p.grad.flatten() for p in model.decoder_parameters()]),
        )

    piwae_enc, piwae_dec = grads(PIWAE(3, 4))
    miwae_enc, _ = grads(MIWAE(3, 4))
    _, iwae_dec = grads(IWAE(12))
    assert torch.allclose(piwae_enc, miwae_enc) and torch.allclose(piwae_dec, iwae_dec)
    assert not torch.allclose(miwae_enc, grads(IWAE(12))[0])


# ---- the VR (Renyi) bound and reweighted wake-sleep ---------------------------------------


@settings(max_examples=100, deadline=None)
@given(log_w=log_weight_arrays, offset=st.sampled_from([0.0, -5000.0]))
def test_vr_is_iwae_at_alpha_0_the_elbo_near_1_and_falls_with_alpha(log_w, offset):
    log_w = (log_w + offset).double()
    iwae, elbo = IWAE(24).bound(log_w), ELBO(24).bound(log_w)
    assert torch.allclose(VR(0.0, 24).bound(log_w), iwae, rtol=0, atol=1e-9)
    assert torch.allclose(VR(1.0, 24).bound(log_w), elbo, rtol=0, atol=1e-9)
    # 1/(1-a) (log mean w^(1-a)) - mean log w is O(1-a) * the spread of log w (up to 120 here).
    assert torch.allclose(VR(1 - 1e-6, 24).bound(log_w), elbo, rtol=0, atol=1e-2)
    alphas = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0]
    values = torch.stack([VR(a, 24).bound(log_w) for a in alphas])
    # A power mean falls with its order (1 - alpha): the bound never rises as alpha grows.
    assert (values.diff(dim=0) <= 1e-9 * (1 + abs(offset))).all()
    assert torch.isfinite(VR(0.5, 24).bound(log_w.float())).all()
    # Near alpha = 1 the bound is O(1 - alpha) over O(1 - alpha): float32 stays as exact as at alpha = 0.
    for alpha in (0.0, 0.9999):
        assert torch.allclose(
            VR(alpha, 24).bound(log_w.float()).double(), VR(alpha, 24).bound(log_w), atol=2e-3, rtol=0
        )


def test_vr_gradient_weighs_log_weights_by_powered_self_normalised_weights():
    log_w = (torch.randn(16, 5, dtype=torch.float64) * 4).requires_grad_()
    VR(0.3, 16).bound(log_w).sum().backward()
    expected = torch.softmax(0.7 * log_w.detach(), dim=0)  # w^(1-a) / sum_j w_j^(1-a)
    assert torch.allclose(log_w.grad, expected)


def test_vr_and_rws_refuse_estimators_they_do_not_support():
    with pytest.raises(ValueError, match="estimator='dreg': objective 'vr' supports reparam, stl"):
        TrainConfig(objective="vr", estimator="dreg")
    with pytest.raises(ValueError, match="objective 'rws' supports wake"):
        TrainConfig(objective="rws", estimator="reparam")
    assert TrainConfig(objective="rws").estimator == "wake" and TrainConfig(objective="vr").estimator == "reparam"
    # A search or a second stage that changes the objective takes the new one's own estimator.
    assert TrainConfig(k=5).with_changes(objective="rws").estimator == "wake"
    assert TrainConfig(k=5, estimator="stl").with_changes(objective="vr").estimator == "stl"
    assert TrainConfig(objective="vr", alpha=0.25).label() == "vr_L1_M1_K5_a0.25_s0"
    assert TrainConfig(objective="rws", k=8).label() == "rws_L1_M1_K8_s0"
    with pytest.raises(ValueError, match="alpha=1.5: must be a number in \\[0, 1\\]"):
        TrainConfig(objective="vr", alpha=1.5)


@pytest.mark.parametrize("layers", [1, 2])
def test_rws_trains_the_encoder_by_wake_phi_and_the_decoder_by_iwae(layers):
    torch.manual_seed(4)
    sizes = {1: ([2], [8]), 2: ([3, 2], [8, 6])}[layers]
    model = build_model(layers, *sizes, x_dim=10).double()
    x = random_binary(6, 10, seed=3).double()
    noise = model.draw_noise(7, len(x), torch.Generator().manual_seed(0))
    for n in noise:
        n.data = n.double()
    encoder, decoder = model.encoder_parameters(), model.decoder_parameters()

    def gradients(loss, params):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])

    rws = RWS(7).surrogate(model.log_weights(x, noise=noise, detach_samples=True), "wake")
    # Independently: the samples as plain numbers, log q from torch.distributions with live
    # parameters, the IWAE weights of those samples as constants.
    h, log_q = x, 0
    with torch.no_grad():
        latents, _ = model.sample_q(x, noise=noise)
    for encoder_layer, fixed in zip(model.encoders, latents):
        mean, log_std = encoder_layer(h)
        log_q = log_q + torch.distributions.Normal(mean, log_std.exp()).log_prob(fixed).sum(-1)
        h = fixed
    with torch.no_grad():
        weights = torch.softmax(model.log_joint(x, latents) - log_q, dim=0)
    wake_phi = (weights * log_q).sum()  # ascended: sum_k w~_k log q(h_k | x)
    assert torch.allclose(gradients(rws.encoder_loss, encoder), -gradients(wake_phi, encoder))
    iwae = IWAE(7).surrogate(model.log_weights(x, noise=noise), "reparam")
    assert torch.allclose(gradients(rws.decoder_loss, decoder), gradients(iwae.decoder_loss, decoder))
    assert torch.allclose(rws.decoder_loss, iwae.decoder_loss)  # its reported bound is IWAE_K
