"""A bare training step to hold the library's against: the same model sizes and maths (Glorot
weights, fused mean / log sigma heads, dynamic binarization, the IWAE_K bound summed over the
batch, fused Adam with the same settings), written for speed, not generality: plain tensors,
one function, no objective or estimator objects. The benchmark prints the library's step rate
as a ratio to this one, measured in the same run.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from .config import TrainConfig


def _linear(n_in: int, n_out: int, fan_out: int | None, device: torch.device) -> list[torch.Tensor]:
    bound = math.sqrt(6.0 / (n_in + (fan_out or n_out)))
    weight = torch.empty(n_out, n_in, device=device).uniform_(-bound, bound).requires_grad_()
    return [weight, torch.zeros(n_out, device=device, requires_grad=True)]


def _stochastic_layer(n_in: int, width: int, n_out: int, device: torch.device) -> list[torch.Tensor]:
    """tanh(W1 .) -> tanh(W2 .) -> one Linear giving mean and log sigma."""
    return [
        *_linear(n_in, width, None, device),
        *_linear(width, width, None, device),
        *_linear(width, 2 * n_out, n_out, device),
    ]


def _trunk(h: torch.Tensor, p: list[torch.Tensor]) -> torch.Tensor:
    return torch.tanh(F.linear(torch.tanh(F.linear(h, p[0], p[1])), p[2], p[3]))


def _gaussian(h: torch.Tensor, p: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    mean, log_std = F.linear(_trunk(h, p), p[4], p[5]).chunk(2, dim=-1)
    return mean, log_std


class BareIWAE:
    """One or two stochastic layers of Burda's sizes, trained on IWAE_K (K = 1 is the VAE)."""

    def __init__(self, layers: int, k: int, device: torch.device, config: TrainConfig | None = None):
        config = config or TrainConfig()
        self.layers, self.k = layers, k
        if layers == 1:
            self.q = [_stochastic_layer(784, 200, 50, device)]
            self.prior: list[list[torch.Tensor]] = []
            self.dec = [
                *_linear(50, 200, None, device),
                *_linear(200, 200, None, device),
                *_linear(200, 784, None, device),
            ]
        else:
            self.q = [_stochastic_layer(784, 200, 100, device), _stochastic_layer(100, 100, 50, device)]
            self.prior = [_stochastic_layer(50, 100, 100, device)]
            self.dec = [
                *_linear(100, 200, None, device),
                *_linear(200, 200, None, device),
                *_linear(200, 784, None, device),
            ]
        self.params = [p for group in (*self.q, *self.prior, self.dec) for p in group]
        self.optimizer = torch.optim.Adam(
            self.params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, fused=True
        )

    def step(self, grey: torch.Tensor, generator: torch.Generator) -> None:
        x = (torch.rand(grey.shape, generator=generator, device=grey.device) < grey).float()
        h, log_q, latents = x, 0.0, []
        for index, layer in enumerate(self.q):
            mean, log_std = _gaussian(h, layer)
            if index == 0:
                mean, log_std = mean.expand(self.k, -1, -1), log_std.expand(self.k, -1, -1)
            eps = torch.randn(mean.shape, generator=generator, device=mean.device)
            h = mean + torch.exp(log_std) * eps
            log_q = log_q - (0.5 * eps.square() + log_std).sum(-1)
            latents.append(h)
        top = latents[-1]
        log_p = -0.5 * top.square().sum(-1)
        if self.layers == 2:
            mean, log_std = _gaussian(top, self.prior[0])
            z = (latents[0] - mean) * torch.exp(-log_std)
            log_p = log_p - (0.5 * z.square() + log_std).sum(-1)
        logits = F.linear(_trunk(latents[0], self.dec), self.dec[4], self.dec[5])
        log_px = (x * logits).sum(-1) - F.softplus(logits).sum(-1)
        log_w = log_px + log_p - log_q  # the log 2 pi terms of p and q cancel dimension by dimension
        loss = -(torch.logsumexp(log_w, dim=0) - math.log(self.k)).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
