"""How far an importance-sampling estimate can be trusted: the effective sample size and the
Pareto-k̂ diagnostic of Pareto-smoothed importance sampling (Vehtari, Simpson, Gelman, Yao &
Gabry, 2024, "Pareto smoothed importance sampling", JMLR 25).

Both are computed from running summaries of the log-weights, never from all of them, so that
the k=5000 evaluation stays in bounded memory: ESS needs log sum w and log sum w^2, k̂ the
largest `pareto_tail_size(k) + 1` log-weights of each image.

k̂ estimates the shape of the generalised Pareto distribution fitted to the largest weights:
the weights' distribution has about 1/k̂ finite moments, so for k̂ > 0.7 the estimate of log p(x)
of that image is unreliable at any practical number of samples (Vehtari et al. §3).
"""

from __future__ import annotations

import math

import torch

PARETO_K_THRESHOLD = 0.7  # Vehtari et al.: above it, importance sampling is unreliable
MIN_TAIL = 5  # ArviZ's minimum: fewer tail weights than this give no k̂


def pareto_tail_size(k: int) -> int:
    """The number of largest weights the generalised Pareto fit uses, as ArviZ (r_eff = 1):
    3 sqrt(k) for k > 225, else k / 5, rounded down. 212 for k = 5000."""
    return int(math.floor(3 * math.sqrt(k) if k > 225 else k / 5))


def effective_sample_size(log_sum_w: torch.Tensor, log_sum_w2: torch.Tensor) -> torch.Tensor:
    """ESS = 1 / sum of squared normalised weights = (sum w)^2 / sum w^2, from the two log-sums."""
    return torch.exp(2 * log_sum_w - log_sum_w2)


def pareto_k_hat(largest_log_w: torch.Tensor, k: int) -> torch.Tensor:
    """k̂ per image from the `pareto_tail_size(k) + 1` largest log-weights `[T + 1, B]` (any order);
    NaN where k is too small for a fit (fewer than 5 tail weights) or the tail is flat.

    The fit is Zhang & Stephens' (2009) empirical-Bayes estimate with Vehtari et al.'s weakly
    informative prior on k̂ (ArviZ's `_gpdfit`), vectorised over images, in float64."""
    tail = pareto_tail_size(k)
    if tail < MIN_TAIL:
        return torch.full(largest_log_w.shape[1:], math.nan, dtype=torch.float64, device=largest_log_w.device)
    if largest_log_w.shape[0] != tail + 1:
        raise ValueError(
            f"pareto_k_hat needs the {tail + 1} largest log-weights for k={k}, got {largest_log_w.shape[0]}"
        )
    ordered = largest_log_w.double().sort(dim=0).values.T  # [B, T + 1] ascending
    shifted = ordered - ordered[:, -1:]  # the largest weight is 1: the fit is scale-free
    exceedances = torch.exp(shifted[:, 1:]) - torch.exp(shifted[:, :1])  # [B, T] over the cutoff, ascending
    n = exceedances.shape[1]
    candidates = 30 + int(math.sqrt(n))
    grid = 1 - torch.sqrt(
        candidates / (torch.arange(1, candidates + 1, dtype=torch.float64, device=ordered.device) - 0.5)
    )
    prior_bs, prior_k = 3, 10
    b = grid / (prior_bs * exceedances[:, int(n / 4 + 0.5) - 1 : int(n / 4 + 0.5)]) + 1 / exceedances[:, -1:]  # [B, C]
    k_at_b = torch.log1p(-b[:, :, None] * exceedances[:, None, :]).mean(-1)  # [B, C]
    profile = n * (torch.log(-b / k_at_b) - k_at_b - 1)
    weights = torch.softmax(profile, dim=1)
    weights = torch.where(weights >= 10 * torch.finfo(torch.float64).eps, weights, 0.0)  # ArviZ drops these
    b_post = (b * weights).sum(1) / weights.sum(1)
    k_post = torch.log1p(-b_post[:, None] * exceedances).mean(1)
    k_hat = (n * k_post + prior_k * 0.5) / (n + prior_k)
    flat = exceedances[:, -1] <= 0
    return torch.where(flat | ~torch.isfinite(k_hat), math.nan, k_hat)
