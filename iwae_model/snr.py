"""Gradient signal-to-noise ratio (Rainforth et al. 2018, "Tighter variational bounds are not
necessarily better", §3-4): for a fixed model and minibatch, R independent draws of the
training gradient estimator; per parameter component SNR = |mean| / std over the draws.

Rainforth et al. show that for IWAE_K with the reparameterisation estimator the encoder's SNR
falls as O(1/sqrt(K)) while the decoder's grows as O(sqrt(K)); DReG (Tucker et al. 2019) keeps
the encoder's from falling. The figures are summarised as the mean and the median over the
components of the encoder (phi) and decoder (theta), and per stochastic layer for deeper models.
"""

from __future__ import annotations

import torch
from torch import nn

from .models import IWAEModel
from .objectives import GradientEstimator, Objective


def parameter_groups(model: IWAEModel) -> dict[str, list[nn.Parameter]]:
    """encoder / decoder, and for L > 1 also each stochastic layer's part: encoder_Ll is
    q(h_l | h_{l-1}); decoder_L1 is p(x | h1), decoder_Ll for l > 1 is p(h_{l-1} | h_l)."""
    groups = {"encoder": model.encoder_parameters(), "decoder": model.decoder_parameters()}
    if model.num_layers > 1:
        decoders = [model.decoder, *model.priors]
        for layer in range(model.num_layers):
            groups[f"encoder_L{layer + 1}"] = list(model.encoders[layer].parameters())
            groups[f"decoder_L{layer + 1}"] = list(decoders[layer].parameters())
    return groups


def gradient_draws(
    model: IWAEModel,
    objective: Objective,
    estimator: GradientEstimator,
    x: torch.Tensor,
    draws: int,
    generator: torch.Generator,
) -> dict[nn.Parameter, torch.Tensor]:
    """Per parameter `[draws, numel]`: the estimator's gradient of the summed batch objective,
    one row per draw (the encoder's from the encoder loss, the decoder's from the decoder loss).

    A loop over draws, not samples: each draw needs its own backward pass. Parameters' .grad are
    left untouched, so this can run in the middle of training."""
    encoder, decoder = model.encoder_parameters(), model.decoder_parameters()
    rows: dict[nn.Parameter, list[torch.Tensor]] = {p: [] for p in (*encoder, *decoder)}
    for _ in range(draws):
        noise = model.draw_noise(objective.num_samples, x.shape[0], generator)
        log_w = model.log_weights(x, noise=noise, **estimator.sampling_options)
        losses = objective.surrogate(log_w, estimator.name)
        for params, loss in ((decoder, losses.decoder_loss), (encoder, losses.encoder_loss)):
            grads = torch.autograd.grad(loss, params, retain_graph=params is decoder, allow_unused=True)
            for p, g in zip(params, grads):
                rows[p].append((torch.zeros_like(p) if g is None else -g).flatten())
    return {p: torch.stack(r) for p, r in rows.items()}


def component_snr(grads: torch.Tensor) -> torch.Tensor:
    """|mean| / std over the draws (axis 0) per component, float64; components whose draws are
    all equal (std 0: no noise to speak of) are left out rather than counted as infinite."""
    grads = grads.double()
    std = grads.std(dim=0)
    keep = std > 0
    return grads.mean(dim=0)[keep].abs() / std[keep]


def gradient_snr(
    model: IWAEModel,
    objective: Objective,
    estimator: GradientEstimator,
    x: torch.Tensor,
    draws: int = 100,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """SNR summaries {group_mean, group_median} for every group of `parameter_groups`, from
    `draws` independent gradient estimates on the binary minibatch x. Seeded by `generator`
    (default: seed 0), so the same call gives the same figures."""
    if draws < 2:
        raise ValueError(f"draws={draws}: the SNR needs at least 2 gradient draws (100 or more for stable figures)")
    generator = generator or torch.Generator(device=x.device).manual_seed(0)
    grads = gradient_draws(model, objective, estimator, x, draws, generator)
    figures = {}
    for name, params in parameter_groups(model).items():
        snr = component_snr(torch.cat([grads[p] for p in params], dim=1))
        figures[f"{name}_mean"] = float(snr.mean())
        figures[f"{name}_median"] = float(snr.median())
    return figures
