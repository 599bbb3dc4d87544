"""Estimates computed from a trained model on binary images: the k-sample log-likelihood
(Burda et al.'s k=5000 protocol), an objective's bound, and active units.

Memory: the k samples of a batch of images are processed in chunks of `chunk_rows` rows
(k * batch rows in all) and reduced with a float64 log-sum-exp per chunk, then across chunks:
that is exact, so chunking changes nothing but memory. The noise of all k samples of the
current image batch is drawn up front (k * batch * sum(latent dims) floats), which is what
makes a chunked estimate equal an unchunked one. Peak for k=5000 with the defaults on CPU
(16 images, 2,048-row chunks, 2 layers): 5000 * 16 * 150 * 4 B = 48 MB of noise plus about
2048 * (2 * 784 + 6 * 200) * 4 B = 23 MB of activations. The diagnostics add the 213 largest
log-weights of each image of the batch (27 KB).

Common noise: the q-noise comes from one generator seeded with EVAL_SEED, drawn batch after
batch, so two models with the same latent sizes, evaluated with the same k, image batch and
device type, see the same noise for every image (`noise_stream` names that): a difference of
their estimates is then free of most of the Monte-Carlo noise, not only of the images' spread.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .importance import effective_sample_size, pareto_k_hat, pareto_tail_size
from .models import IWAEModel
from .objectives import Objective

EVAL_SEED = 123  # Burda's evaluation seed, here for the q-samples
ACTIVE_UNIT_IMAGES = 500
ACTIVE_UNIT_THRESHOLD = 0.01  # the authors' code; some secondary sources quote 0.02


def default_chunk_rows(device: torch.device) -> int:
    # CPU: a chunk whose activations stay in cache-friendly sizes; GPU: large enough to fill it.
    return 131072 if device.type == "cuda" else 2048


def default_image_batch(device: torch.device) -> int:
    return 100 if device.type == "cuda" else 16


def eval_generator(device: torch.device) -> torch.Generator:
    """A fresh generator with the evaluation seed: every evaluation of every model draws the
    same q-noise, so differences between models are not Monte-Carlo noise."""
    return torch.Generator(device=device).manual_seed(EVAL_SEED)


def noise_stream(model: IWAEModel, k: int, device: torch.device) -> str:
    """A name for the q-noise an evaluation with the default image batch draws: equal names,
    equal noise per image."""
    latents = "+".join(map(str, model.latent_dims))
    return f"seed {EVAL_SEED}, k {k}, latents {latents}, {default_image_batch(device)} images/batch, {device.type}"


@dataclass
class ImportanceEstimate:
    """Per-image results of a k-sample importance-sampling pass, float64 `[N]` each."""

    log_likelihood: torch.Tensor  # log 1/k sum_i w_i
    ess: torch.Tensor | None  # effective sample size, 1..k (None: diagnostics not asked for)
    pareto_k: torch.Tensor | None  # PSIS k̂; > 0.7: unreliable; NaN for k < 25


@torch.no_grad()
def importance_sampling(
    model: IWAEModel,
    x: torch.Tensor,
    k: int = 5000,
    generator: torch.Generator | None = None,
    image_batch: int | None = None,
    chunk_rows: int | None = None,
    progress: bool = False,
    diagnostics: bool = True,
) -> ImportanceEstimate:
    """log p(x) estimated as log 1/k sum_i w_i per image for binary x `[N, D]`, and with
    `diagnostics` the ESS and Pareto k̂ of the same weights, from running summaries of each
    chunk (log sum w, log sum w^2, the largest few log w), never all k log-weights at once.

    The first encoder runs once per image; the k samples go through the rest of the model in
    chunks of about `chunk_rows` rows (samples x images)."""
    device = x.device
    image_batch = image_batch or default_image_batch(device)
    chunk_rows = chunk_rows or default_chunk_rows(device)
    if generator is None:
        generator = eval_generator(device)
    keep = pareto_tail_size(k) + 1
    estimates, ess, pareto_k = [], [], []
    for start in tqdm(range(0, len(x), image_batch), desc=f"log p(x), k={k}", unit="batch",
                      disable=not progress, file=sys.stderr):
        xb = x[start:start + image_batch]
        first_layer = model.encoders[0](xb)
        noise = model.draw_noise(k, len(xb), generator)
        samples_per_chunk = max(1, chunk_rows // len(xb))
        log_sums, log_square_sums, largest = [], [], xb.new_empty((0, len(xb)), dtype=torch.float64)
        for s in range(0, k, samples_per_chunk):
            log_w = model.log_weights(xb, noise=[n[s:s + samples_per_chunk] for n in noise],
                                      first_layer=first_layer).double()
            log_sums.append(torch.logsumexp(log_w, dim=0))
            if diagnostics:
                log_square_sums.append(torch.logsumexp(2 * log_w, dim=0))
                pool = torch.cat([largest, log_w])
                largest = pool.topk(min(keep, len(pool)), dim=0).values
        log_sum = torch.logsumexp(torch.stack(log_sums), dim=0)
        estimates.append(log_sum - math.log(k))
        if diagnostics:
            ess.append(effective_sample_size(log_sum, torch.logsumexp(torch.stack(log_square_sums), dim=0)))
            pareto_k.append(pareto_k_hat(largest, k))
    return ImportanceEstimate(torch.cat(estimates), torch.cat(ess) if diagnostics else None,
                              torch.cat(pareto_k) if diagnostics else None)


def log_likelihood(
    model: IWAEModel,
    x: torch.Tensor,
    k: int = 5000,
    generator: torch.Generator | None = None,
    image_batch: int | None = None,
    chunk_rows: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """log p(x) estimated as log 1/k sum_i w_i per image, float64 `[N]` (no diagnostics)."""
    return importance_sampling(model, x, k, generator, image_batch, chunk_rows, progress, diagnostics=False).log_likelihood


@torch.no_grad()
def bound(
    model: IWAEModel,
    x: torch.Tensor,
    objective: Objective,
    generator: torch.Generator | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """The objective's bound per image (e.g. the test IWAE_{M,K} bound), float64 `[N]`."""
    chunk_rows = chunk_rows or default_chunk_rows(x.device)
    if generator is None:
        generator = eval_generator(x.device)
    batch = max(1, chunk_rows // objective.num_samples)
    return torch.cat([
        objective.bound(model.log_weights(x[s:s + batch], objective.num_samples, generator)).double()
        for s in range(0, len(x), batch)
    ])


@torch.no_grad()
def active_units(
    model: IWAEModel,
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    threshold: float = ACTIVE_UNIT_THRESHOLD,
) -> list[int]:
    """Burda's active units per stochastic layer: units whose posterior mean varies across
    the images x (Burda: the first 500 training images, one binarization) with variance
    above `threshold`; a layer above the first is conditioned on one sample of the one below."""
    if generator is None:
        generator = eval_generator(x.device)
    means = model.posterior_means(x, generator)
    return [int((mean.double().var(dim=0, unbiased=False) > threshold).sum()) for mean in means]
