import math

import pytest
import torch
from conftest import FLOAT32_REORDER_RTOL, random_binary
from torch import nn
from torch.nn import functional as F

from iwae_model import build_model
from iwae_model.models import log_normal


def linear_shapes(module):
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def test_burda_architectures():
    one = build_model(1)
    assert linear_shapes(one.encoders) == [(784, 200), (200, 200), (200, 100)]  # fused mean / log-std head
    assert linear_shapes(one.decoder) == [(50, 200), (200, 200), (200, 784)]
    two = build_model(2)
    assert linear_shapes(two.encoders) == [(784, 200), (200, 200), (200, 200), (100, 100), (100, 100), (100, 100)]
    assert linear_shapes(two.priors) == [(50, 100), (100, 100), (100, 200)]
    assert linear_shapes(two.decoder) == [(100, 200), (200, 200), (200, 784)]
    assert all(isinstance(m, nn.Tanh) for m in two.decoder.trunk if not isinstance(m, nn.Linear))


def test_sizes_are_configurable_and_bad_sizes_are_named():
    model = build_model(2, latent_dims=[8, 4], hidden_dims=[32, 16], depth=1, x_dim=20)
    assert linear_shapes(model.decoder) == [(8, 32), (32, 20)]
    with pytest.raises(ValueError, match="layers=2 but latent_dims=\\[8\\]"):
        build_model(2, latent_dims=[8], hidden_dims=[32])
    with pytest.raises(ValueError, match="layers=3"):
        build_model(3)


def test_glorot_init_and_decoder_bias_at_the_logit_of_the_pixel_mean():
    torch.manual_seed(0)
    mean = torch.linspace(0, 1, 784)
    model = build_model(1, train_mean=mean)
    expected_bias = torch.logit(mean.clamp(0.001, 0.999))
    assert torch.allclose(model.decoder.out.bias, expected_bias)
    first = model.encoders[0].trunk[0]
    bound = math.sqrt(6 / (784 + 200))
    assert first.weight.abs().max() <= bound and first.weight.abs().max() > 0.95 * bound
    assert first.weight.var().item() == pytest.approx(bound**2 / 3, rel=0.02)
    head_bound = math.sqrt(6 / (200 + 50))  # each half of the fused head is its own Glorot layer
    assert model.encoders[0].head.weight.abs().max() <= head_bound
    assert (model.encoders[0].head.bias == 0).all()


@pytest.mark.parametrize("layers", [1, 2])
def test_probabilistic_interface_shapes_and_consistency(layers):
    torch.manual_seed(0)
    model = build_model(layers)
    x = random_binary(3, 784)
    g = torch.Generator().manual_seed(0)
    latents, log_q = model.sample_q(x, 7, g)
    assert [h.shape for h in latents] == [(7, 3, d) for d in model.latent_dims]
    assert log_q.shape == (7, 3)
    log_p = model.log_joint(x, latents)
    assert log_p.shape == (7, 3)
    same = model.log_weights(x, 7, torch.Generator().manual_seed(0))
    assert torch.allclose(same, log_p - log_q)
    # The path-derivative form has the same values, only its gradients differ. It computes log q
    # by another formula ((h - mean) / std instead of eps), so the two agree up to float32
    # rounding: an ulp of a log-weight above 1024 is 1.2e-4, more than a fixed atol of 1e-4.
    path = model.log_weights(x, 7, torch.Generator().manual_seed(0), stop_q_params=True)
    assert torch.allclose(path, same, rtol=FLOAT32_REORDER_RTOL, atol=0)
    assert model.sample(5).shape == (5, 784)
    assert model.reconstruct(x).shape == (3, 784)


def test_log_densities_against_torch_distributions():
    torch.manual_seed(0)
    model = build_model(2, latent_dims=[3, 2], hidden_dims=[8, 8], x_dim=6)
    x = random_binary(4, 6)
    latents, log_q = model.sample_q(x, 5, torch.Generator().manual_seed(1))
    h1, h2 = latents
    q1 = torch.distributions.Normal(*_mean_std(model.encoders[0](x)))
    q2 = torch.distributions.Normal(*_mean_std(model.encoders[1](h1)))
    expected_q = q1.log_prob(h1).sum(-1) + q2.log_prob(h2).sum(-1)
    assert torch.allclose(log_q, expected_q, atol=1e-5)
    p1 = torch.distributions.Normal(*_mean_std(model.priors[0](h2)))
    px = torch.distributions.Bernoulli(logits=model.decoder.logits(h1))
    expected_p = (
        torch.distributions.Normal(0.0, 1.0).log_prob(h2).sum(-1)
        + p1.log_prob(h1).sum(-1)
        + px.log_prob(x.expand(5, -1, -1)).sum(-1)
    )
    assert torch.allclose(model.log_joint(x, latents), expected_p, atol=1e-5)
    h = torch.randn(4, 3)
    assert torch.allclose(
        log_normal(h, torch.zeros(3), torch.zeros(3)), torch.distributions.Normal(0.0, 1.0).log_prob(h).sum(-1)
    )


def _mean_std(mean_log_std):
    mean, log_std = mean_log_std
    return mean, log_std.exp()


def test_first_encoder_runs_once_per_image_not_per_sample():
    model = build_model(2)
    rows = []
    model.encoders[0].register_forward_hook(lambda module, args, out: rows.append(args[0].shape))
    model.log_weights(random_binary(4, 784), 50)
    assert rows == [(4, 784)]


def test_sample_is_a_draw_from_the_prior_in_pixel_probabilities():
    torch.manual_seed(0)
    model = build_model(2)
    images = model.sample(64, torch.Generator().manual_seed(0))
    assert ((images >= 0) & (images <= 1)).all()
    again = model.sample(64, torch.Generator().manual_seed(0))
    assert torch.equal(images, again)
    assert not torch.equal(images, model.sample(64, torch.Generator().manual_seed(1)))


def test_multiply_adds_count_the_first_encoder_once():
    model = build_model(1)
    encoder = 784 * 200 + 200 * 200 + 200 * 100
    per_sample = 50 * 200 + 200 * 200 + 200 * 784
    assert model.multiply_adds(1) == encoder + per_sample
    assert model.multiply_adds(5000) == encoder + 5000 * per_sample


def test_bernoulli_log_likelihood_matches_bce():
    torch.manual_seed(0)
    model = build_model(1, latent_dims=[4], hidden_dims=[16], x_dim=30)
    x, h = random_binary(6, 30), torch.randn(3, 6, 4)
    logits = model.decoder.logits(h)
    expected = -F.binary_cross_entropy_with_logits(logits, x.expand(3, -1, -1), reduction="none").sum(-1)
    assert torch.allclose(model.decoder.log_prob(x, h), expected, atol=1e-5)
