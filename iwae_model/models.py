"""Burda et al.'s generative model p(x, h1..hL) and inference network q(h1..hL | x).

Shapes: images `[B, D]`; every latent and every log-density carries the sample axis first,
`[k, B, d]` and `[k, B]`. The first encoder (x -> h1) runs once per image and only its
Gaussian noise is per sample; everything above it runs on `k * B` rows at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def glorot_(linear: nn.Linear, fan_out: int | None = None) -> nn.Linear:
    """W ~ U(-s, s), s = sqrt(6 / (fan_in + fan_out)), b = 0 (Burda's `Linear.random`).
    `fan_out` lets a fused head be initialised as the separate layers it stands for."""
    fan_in = linear.in_features
    bound = math.sqrt(6.0 / (fan_in + (fan_out or linear.out_features)))
    nn.init.uniform_(linear.weight, -bound, bound)
    nn.init.zeros_(linear.bias)
    return linear


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """tanh after every Linear: the deterministic trunk of each stochastic layer."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [glorot_(nn.Linear(n_in, n_out)), nn.Tanh()]
    return nn.Sequential(*layers)


def log_normal(h: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(h; mean, exp(log_std)^2) summed over the last axis."""
    z = (h - mean) * torch.exp(-log_std)
    return -(0.5 * z.square() + log_std).sum(-1) - h.shape[-1] * HALF_LOG_2PI


def log_std_normal(h: torch.Tensor) -> torch.Tensor:
    return -0.5 * h.square().sum(-1) - h.shape[-1] * HALF_LOG_2PI


class GaussianLayer(nn.Module):
    """A tanh MLP, then one Linear whose two halves are the mean and log sigma
    (Burda's GaussianSampler: sigma = exp(linear), no clamping). The two heads are fused into
    one matmul for speed but initialised as two separate Glorot layers."""

    def __init__(self, n_in: int, hidden: Sequence[int], n_out: int):
        super().__init__()
        self.trunk = mlp([n_in, *hidden])
        self.head = glorot_(nn.Linear(hidden[-1], 2 * n_out), fan_out=n_out)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.head(self.trunk(h)).chunk(2, dim=-1)
        return mean, log_std


class BernoulliDecoder(nn.Module):
    """p(x | h1): a tanh MLP and a Linear giving the logits of 784 independent Bernoullis."""

    def __init__(self, n_in: int, hidden: Sequence[int], x_dim: int, train_mean: torch.Tensor | None):
        super().__init__()
        self.trunk = mlp([n_in, *hidden])
        self.out = glorot_(nn.Linear(hidden[-1], x_dim))
        if train_mean is not None:
            # Start at the marginal pixel frequencies, as Burda's get_train_bias_np does.
            self.out.bias.data.copy_(torch.logit(train_mean.clamp(0.001, 0.999)))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.trunk(h))

    def log_prob(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """log p(x | h) = sum_j x_j l_j - softplus(l_j) for binary x `[B, D]`, h `[k, B, d]`.
        All 784 logits are needed anyway, for the softplus."""
        logits = self.logits(h)
        return (x * logits).sum(-1) - F.softplus(logits).sum(-1)


class IWAEModel(nn.Module):
    """L stochastic layers. q(h1|x) q(h2|h1) ... and p(hL) p(h_{L-1}|hL) ... p(x|h1),
    all conditionals diagonal Gaussian except the Bernoulli observation model."""

    def __init__(
        self,
        latent_dims: Sequence[int],
        hidden_dims: Sequence[int],
        depth: int = 2,
        x_dim: int = 784,
        train_mean: torch.Tensor | None = None,
    ):
        super().__init__()
        if len(latent_dims) != len(hidden_dims) or not latent_dims:
            raise ValueError(
                f"latent_dims={list(latent_dims)} and hidden_dims={list(hidden_dims)} must have one "
                f"entry per stochastic layer"
            )
        self.latent_dims = list(latent_dims)
        self.hidden_dims = list(hidden_dims)
        self.x_dim = x_dim
        inputs = [x_dim, *latent_dims[:-1]]
        # encoders[l]: q(h_{l+1} | h_l) with h_0 = x; priors[l]: p(h_{l+1} | h_{l+2}) for l < L-1,
        # the mirror image of encoders[l+1] (Burda: q h1-100-100-h2, p h2-100-100-h1).
        self.encoders = nn.ModuleList(
            GaussianLayer(n_in, [width] * depth, d) for n_in, width, d in zip(inputs, hidden_dims, latent_dims)
        )
        self.priors = nn.ModuleList(
            GaussianLayer(latent_dims[i + 1], [hidden_dims[i + 1]] * depth, latent_dims[i])
            for i in range(len(latent_dims) - 1)
        )
        self.decoder = BernoulliDecoder(latent_dims[0], [hidden_dims[0]] * depth, x_dim, train_mean)

    @property
    def num_layers(self) -> int:
        return len(self.latent_dims)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """phi: the parameters of q."""
        return list(self.encoders.parameters())

    def decoder_parameters(self) -> list[nn.Parameter]:
        """theta: the parameters of p."""
        return [*self.priors.parameters(), *self.decoder.parameters()]

    def draw_noise(self, k: int, batch: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """The standard-normal noise of k reparameterised samples per image, one tensor per layer."""
        weight = self.decoder.out.weight
        return [
            torch.randn((k, batch, d), generator=generator, device=weight.device, dtype=weight.dtype)
            for d in self.latent_dims
        ]

    def sample_q(
        self,
        x: torch.Tensor,
        k: int | None = None,
        generator: torch.Generator | None = None,
        noise: Sequence[torch.Tensor] | None = None,
        stop_q_params: bool = False,
        detach_samples: bool = False,
        first_layer: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """k reparameterised samples h ~ q(h | x): latents `[h1..hL]` each `[k, B, d]` and
        log q(h | x) `[k, B]`. Pass `noise` (from `draw_noise`) instead of k to fix the draw.

        `stop_q_params` evaluates log q with the distribution parameters detached while the
        samples still depend on phi: the path-derivative form that STL and DReG need.
        `detach_samples` holds the samples fixed (no gradient through them, so none reaches log p)
        and evaluates log q with live parameters: the score form of RWS's wake-phi update.
        `first_layer` is q(h1 | x)'s (mean, log_std) when already computed, so that an
        evaluation split into chunks of samples still runs the first encoder once per image."""
        if noise is None:
            if k is None:
                raise ValueError("sample_q needs k or noise")
            noise = self.draw_noise(k, x.shape[0], generator)
        latents: list[torch.Tensor] = []
        log_q = x.new_zeros(())
        h = x
        for layer, (encoder, eps) in enumerate(zip(self.encoders, noise)):
            mean, log_std = first_layer if layer == 0 and first_layer is not None else encoder(h)
            h = mean + torch.exp(log_std) * eps
            if detach_samples:
                h = h.detach()
            latents.append(h)
            if stop_q_params or detach_samples:
                parameters = (mean, log_std) if detach_samples else (mean.detach(), log_std.detach())
                log_q = log_q + log_normal(h, *parameters)
            else:
                # (h - mean) / std is eps exactly: skip the subtraction and its rounding.
                log_q = log_q - (0.5 * eps.square() + log_std).sum(-1) - eps.shape[-1] * HALF_LOG_2PI
        return latents, log_q

    def log_joint(self, x: torch.Tensor, latents: Sequence[torch.Tensor]) -> torch.Tensor:
        """log p(x, h1..hL) `[k, B]` for binary images x `[B, D]`."""
        log_p = log_std_normal(latents[-1]) + self.decoder.log_prob(x, latents[0])
        for prior, h_below, h_above in zip(self.priors, latents[:-1], latents[1:]):
            log_p = log_p + log_normal(h_below, *prior(h_above))
        return log_p

    def log_prior(self, latents: Sequence[torch.Tensor]) -> torch.Tensor:
        """log p(h1..hL) `[k, B]`: log_joint without log p(x|h1), for annealing from the prior
        (ais.py). log_joint keeps its own sum, so its rounding is what it always was."""
        log_p = log_std_normal(latents[-1])
        for prior, h_below, h_above in zip(self.priors, latents[:-1], latents[1:]):
            log_p = log_p + log_normal(h_below, *prior(h_above))
        return log_p

    def log_weights(
        self, x: torch.Tensor, k: int | None = None, generator: torch.Generator | None = None, **sampling: Any
    ) -> torch.Tensor:
        """log w = log p(x, h) - log q(h | x) for k samples per image: `[k, B]`. `sampling`:
        sample_q's noise, stop_q_params, detach_samples and first_layer."""
        latents, log_q = self.sample_q(x, k, generator, **sampling)
        return self.log_joint(x, latents) - log_q

    def posterior_means(self, x: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """E_q[h_l | h_{l-1}] per layer `[B, d_l]`, each layer above the first conditioned on one
        sample of the layer below (Burda's get_units_variances), its noise drawn on the
        generator's device and moved to the model's."""
        means = []
        h = x
        for encoder in self.encoders:
            mean, log_std = encoder(h)
            means.append(mean)
            eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
            h = mean + torch.exp(log_std) * eps.to(mean.device)
        return means

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images from the prior, as Bernoulli means `[n, D]` (what sample grids show)."""
        h = self.draw_noise(1, n, generator)[-1][0]
        for prior in reversed(self.priors):
            mean, log_std = prior(h)
            h = mean + torch.exp(log_std) * torch.randn(
                mean.shape, generator=generator, device=mean.device, dtype=mean.dtype
            )
        return torch.sigmoid(self.decoder.logits(h))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Bernoulli means of p(x | h1) at the posterior means (no sampling): `[B, D]`."""
        return torch.sigmoid(self.decoder.logits(self.encoders[0](x)[0]))

    def multiply_adds(self, k: int) -> int:
        """Multiply-adds of one forward pass of `log_weights` for one image and k samples,
        counting only the Linear layers: the first encoder once, everything else k times."""

        def count(module: nn.Module) -> int:
            return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))

        per_sample = sum(count(m) for m in [*self.encoders[1:], *self.priors, self.decoder])
        return count(self.encoders[0]) + k * per_sample


def build_model(
    layers: int = 1,
    latent_dims: Sequence[int] | None = None,
    hidden_dims: Sequence[int] | None = None,
    depth: int = 2,
    x_dim: int = 784,
    train_mean: torch.Tensor | None = None,
) -> IWAEModel:
    """Burda's architectures by default: 1 layer 784-200-200-50, 2 layers with latents 100
    and 50 (x-200-200-h1, h1-100-100-h2 and the mirror image for p).

    Deviation from the authors' code, on purpose: their RNG was re-seeded for every layer, so
    all same-shaped layers started with identical weights; here each layer gets its own draw
    from torch's generator (seed it with `torch.manual_seed` before calling)."""
    defaults = {1: ([50], [200]), 2: ([100, 50], [200, 100])}
    if layers not in defaults and (latent_dims is None or hidden_dims is None):
        raise ValueError(
            f"layers={layers}: Burda's architectures have 1 or 2 stochastic layers; "
            f"pass latent_dims and hidden_dims for other depths"
        )
    default_latent, default_hidden = defaults.get(layers, (None, None))
    latent_dims = list(latent_dims or default_latent)
    hidden_dims = list(hidden_dims or default_hidden)
    if len(latent_dims) != layers:
        raise ValueError(f"layers={layers} but latent_dims={latent_dims} has {len(latent_dims)} entries")
    return IWAEModel(latent_dims, hidden_dims, depth, x_dim, train_mean)
