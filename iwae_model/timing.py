"""Seconds per training step and per evaluated image, measured on the device at hand: what the
benchmark reports and what a sweep's plan (`python -m sweep.run --dry-run`) is estimated from.

Images are random grey levels binarized on the fly as training does (`data.binarize`): the
time does not depend on pixel values.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .ais import ais
from .config import TrainConfig
from .data import binarize
from .likelihood import bound, default_image_batch, importance_sampling
from .training import build_optimizer, build_surrogate, train_step

BATCHES = 50  # distinct batches cycled through, so no single batch sits in cache


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cycled(
    step: Callable[[torch.Tensor], None], images: torch.Tensor, batch_size: int, device: torch.device
) -> Callable[[int], None]:
    """A function that runs `step` n times over successive batches of `images`, cycling, and
    waits for the device at the end."""
    batches = len(images) // batch_size

    def run(n: int) -> None:
        for index in range(n):
            b = index % batches
            step(images[b * batch_size : (b + 1) * batch_size])
        sync(device)

    return run


def training_steps(config: TrainConfig, device: torch.device) -> Callable[[int], None]:
    """A function that runs n optimizer steps of `config` (its model, objective, estimator,
    batch size and compile setting) on random images, as train() does."""
    torch.manual_seed(0)
    images = torch.rand(config.batch_size * BATCHES, config.pixels, device=device)
    model = config.build_model(train_mean=images.mean(0).cpu()).to(device)
    optimizer = build_optimizer(model, config)
    objective, estimator = config.build_objective(), config.build_estimator()
    generator = torch.Generator(device=device).manual_seed(0)
    params = model.encoder_parameters(), model.decoder_parameters()
    surrogate = build_surrogate(model, objective, estimator, config.compile)

    def step(batch: torch.Tensor) -> None:
        train_step(model, optimizer, surrogate, objective.num_samples, binarize(batch, generator), generator, params)

    return cycled(step, images, config.batch_size, device)


def seconds_per_call(run: Callable[[int], None], n: int) -> float:
    start = time.perf_counter()
    run(n)
    return (time.perf_counter() - start) / n


def training_step_seconds(config: TrainConfig, device: torch.device, steps: int, warmup: int) -> float:
    """Mean wall-clock seconds of one optimizer step of `config` after `warmup` untimed steps."""
    run = training_steps(config, device)
    run(warmup)
    return seconds_per_call(run, steps)


def bound_seconds_per_image(config: TrainConfig, device: torch.device, images: int = 200) -> float:
    """Seconds per image of the objective's bound (the per-pass validation and test bounds)."""
    model = config.build_model().to(device).eval()
    x = torch.bernoulli(torch.full((images, config.pixels), 0.13, device=device))
    objective = config.build_objective()
    bound(model, x[:2], objective)
    sync(device)
    start = time.perf_counter()
    bound(model, x, objective)
    sync(device)
    return (time.perf_counter() - start) / images


def likelihood_seconds_per_image(
    config: TrainConfig, device: torch.device, k: int, images: int, diagnostics: bool = True
) -> float:
    """Seconds per image of the k-sample log-likelihood estimate, with the importance-sampling
    diagnostics as the final evaluation computes them, or without. On CUDA, after one whole image
    batch at the same k (kernel selection, the allocator's pools); the CPU needs one small call."""
    torch.manual_seed(0)
    model = config.build_model().to(device).eval()
    x = torch.bernoulli(torch.full((images, config.pixels), 0.13, device=device))
    if device.type == "cuda":
        importance_sampling(model, x[: default_image_batch(device)], k, diagnostics=diagnostics)
    else:
        importance_sampling(model, x[:1], min(k, 100), diagnostics=diagnostics)
    sync(device)
    start = time.perf_counter()
    importance_sampling(model, x, k, diagnostics=diagnostics)
    sync(device)
    return (time.perf_counter() - start) / images


def ais_seconds_per_image(
    config: TrainConfig, device: torch.device, steps: int, chains: int, images: int, start: str = "encoder"
) -> float:
    """Seconds per image of AIS with `steps` distributions and `chains` chains. Every transition
    costs the same whatever the model's training (always the same leapfrog steps), so an
    untrained model times it; the time grows in proportion to `steps`."""
    torch.manual_seed(0)
    model = config.build_model().to(device).eval()
    x = torch.bernoulli(torch.full((images, config.pixels), 0.13, device=device))
    ais(model, x[:1], 2, chains, start)  # kernels and allocator pools, as the IS timing's first call
    sync(device)
    began = time.perf_counter()
    ais(model, x, steps, chains, start)
    sync(device)
    return (time.perf_counter() - began) / images
