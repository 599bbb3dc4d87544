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

Common noise, on any device: the q-noise of image i and sample s depends on (EVAL_SEED, i, s)
and k only. It is drawn on the CPU, one generator per block of NOISE_BLOCK images seeded from
(EVAL_SEED, block), and copied to the model's device: a CUDA generator's output depends on the
GPU's number of multiprocessors, so an A10G, an H100 and a MIG slice would each draw other
noise. Two models with the same latent sizes evaluated with the same k therefore see the same
noise for every image, on any device, image batch and chunking (`noise_stream` names it): a
difference of their estimates is then free of most of the Monte-Carlo noise, not only of the
images' spread. The bounds draw theirs the same way; the active units' binarization and
posterior noise come from one CPU generator seeded with EVAL_SEED, so they too are the same on
any device.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .data import Dataset, binarize_once
from .importance import effective_sample_size, pareto_k_hat, pareto_tail_size
from .models import IWAEModel
from .objectives import Objective

EVAL_SEED = 123  # Burda's evaluation seed, here for the q-samples
ACTIVE_UNIT_IMAGES = 500
ACTIVE_UNIT_THRESHOLD = 0.01  # the authors' code; some secondary sources quote 0.02


def default_chunk_rows(device: torch.device) -> int:
    # CPU: a chunk whose activations stay in cache-friendly sizes; GPU: large enough to fill it.
    return 131072 if device.type == "cuda" else 2048


NOISE_BLOCK = 16  # images per independently seeded block of evaluation noise


def default_image_batch(device: torch.device) -> int:
    # Whole noise blocks, so that no block is drawn for two batches.
    return 7 * NOISE_BLOCK if device.type == "cuda" else NOISE_BLOCK


def eval_generator() -> torch.Generator:
    """A fresh CPU generator with the evaluation seed (the active units' draws)."""
    return torch.Generator().manual_seed(EVAL_SEED)


def block_seed(block: int) -> int:
    """The seed of block `block` of the evaluation noise: a function of (EVAL_SEED, block) only."""
    return int(np.random.SeedSequence([EVAL_SEED, block]).generate_state(1)[0])


def evaluation_noise(model: IWAEModel, k: int, start: int, stop: int) -> list[torch.Tensor]:
    """The standard-normal q-noise of k samples for images start..stop-1, one `[k, stop - start,
    d]` tensor per stochastic layer on the model's device: whole blocks of NOISE_BLOCK images
    drawn on the CPU (only the asked-for images kept), so image i's noise is the same whichever
    batch it is evaluated in."""
    weight = model.decoder.out.weight
    first, last = start // NOISE_BLOCK, (stop - 1) // NOISE_BLOCK
    generator = torch.Generator()
    blocks: list[list[torch.Tensor]] = [[] for _ in model.latent_dims]
    for block in range(first, last + 1):
        generator.manual_seed(block_seed(block))
        for layer, d in zip(blocks, model.latent_dims):
            layer.append(torch.randn((k, NOISE_BLOCK, d), generator=generator, dtype=weight.dtype))
    offset = start - first * NOISE_BLOCK
    return [
        (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))[:, offset : offset + stop - start].to(weight.device)
        for parts in blocks
    ]


def noise_stream(model: IWAEModel, k: int) -> str:
    """A name for the q-noise an evaluation draws: equal names, equal noise per image."""
    latents = "+".join(map(str, model.latent_dims))
    return f"seed {EVAL_SEED}, k {k}, latents {latents}, drawn per {NOISE_BLOCK}-image block on the CPU"


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
    keep = pareto_tail_size(k) + 1
    estimates, ess, pareto_k = [], [], []
    for start in tqdm(
        range(0, len(x), image_batch), desc=f"log p(x), k={k}", unit="batch", disable=not progress, file=sys.stderr
    ):
        xb = x[start : start + image_batch]
        first_layer = model.encoders[0](xb)
        noise = evaluation_noise(model, k, start, start + len(xb))
        samples_per_chunk = max(1, chunk_rows // len(xb))
        log_sums, log_square_sums, largest = [], [], xb.new_empty((0, len(xb)), dtype=torch.float64)
        for s in range(0, k, samples_per_chunk):
            log_w = model.log_weights(
                xb, noise=[n[s : s + samples_per_chunk] for n in noise], first_layer=first_layer
            ).double()
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
    return ImportanceEstimate(
        torch.cat(estimates), torch.cat(ess) if diagnostics else None, torch.cat(pareto_k) if diagnostics else None
    )


def log_likelihood(model: IWAEModel, x: torch.Tensor, k: int = 5000, **options: Any) -> torch.Tensor:
    """log p(x) estimated as log 1/k sum_i w_i per image, float64 `[N]`, without the diagnostics;
    `options`: importance_sampling's image_batch, chunk_rows and progress."""
    return importance_sampling(model, x, k, diagnostics=False, **options).log_likelihood


@torch.no_grad()
def bound(model: IWAEModel, x: torch.Tensor, objective: Objective, chunk_rows: int | None = None) -> torch.Tensor:
    """The objective's bound per image (e.g. the test IWAE_{M,K} bound), float64 `[N]`."""
    chunk_rows = chunk_rows or default_chunk_rows(x.device)
    # Whole noise blocks per chunk, so that no block is drawn twice.
    batch = max(NOISE_BLOCK, chunk_rows // objective.num_samples // NOISE_BLOCK * NOISE_BLOCK)
    return torch.cat(
        [
            objective.bound(
                model.log_weights(
                    x[s : s + batch], noise=evaluation_noise(model, objective.num_samples, s, min(s + batch, len(x)))
                )
            ).double()
            for s in range(0, len(x), batch)
        ]
    )


@torch.no_grad()
def active_units(
    model: IWAEModel,
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    threshold: float = ACTIVE_UNIT_THRESHOLD,
) -> list[int]:
    """Burda's active units per stochastic layer: units whose posterior mean varies across
    the images x (Burda: the first 500 training images, one binarization) with variance
    above `threshold`; a layer above the first is conditioned on one sample of the one below,
    drawn from `generator` (default: the CPU evaluation generator, so any device counts alike)."""
    means = model.posterior_means(x, generator or eval_generator())
    return [int((mean.double().var(dim=0, unbiased=False) > threshold).sum()) for mean in means]


def burda_active_units(model: IWAEModel, data: Dataset) -> list[int]:
    """Active units as Burda measured them: on the first 500 training images, binarized once
    with the evaluation seed (on the CPU, so the bits do not depend on the device)."""
    return active_units(model, binarize_once(data.train[:ACTIVE_UNIT_IMAGES], EVAL_SEED))
