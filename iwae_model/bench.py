"""Throughput of training and k=5000 evaluation, against this machine's matmul peak.

    python -m iwae_model.bench [--quick] [--device auto|cpu|cuda]

Prints one JSON line per figure. `fraction_of_peak` divides the model's arithmetic rate by
the measured float32 matmul rate: multiply-adds of the Linear layers (first encoder once per
image, everything else once per sample), x2 for FLOPs, x3 for a training step (forward +
backward). Elementwise work (tanh, softplus, sampling, Adam) is not counted, so it shows up
as the gap to 1. The peak is measured again at the end: on a shared machine a slow spell
during the first measurement would overstate every fraction, and the two lines show it.
`vs_bare_loop` lines give the library's training step rate as a ratio to iwae_model.bare_loop
(the same maths as one plain function): the median over alternating rounds.
`is_diagnostics_overhead` is the k=5000 evaluation's extra time for its importance-sampling
diagnostics (ESS, Pareto k̂), as a fraction, again the median over alternating rounds. The
timings come from iwae_model.timing (random images, binarized as training does). `ais` lines
time annealed importance sampling (iwae_model.ais) at the evaluate CLI's defaults (16 chains,
encoder start, 10 leapfrog steps) with a short schedule; its cost grows linearly with the
number of distributions, which `seconds_per_image_per_1000_steps` scales to.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

from .ais import LEAPFROG_STEPS
from .bare_loop import BareIWAE
from .config import TrainConfig
from .device import pin_float32, resolve_device
from .errors import DeviceError, exit_with
from .likelihood import default_image_batch
from .timing import (
    BATCHES,
    ais_seconds_per_image,
    cycled,
    likelihood_seconds_per_image,
    seconds_per_call,
    sync,
    training_step_seconds,
    training_steps,
)

BARE_LOOP_CASES = [  # the bare loop knows IWAE_K only (K = 1: the VAE)
    ("vae_k1_L1", dict(layers=1, objective="vae", k=1)),
    ("vae_k1_L2", dict(layers=2, objective="vae", k=1)),
    ("iwae_k5_L1", dict(layers=1, objective="iwae", k=5)),
    ("iwae_k5_L2", dict(layers=2, objective="iwae", k=5)),
    ("iwae_k50_L1", dict(layers=1, objective="iwae", k=50)),
    ("iwae_k50_L2", dict(layers=2, objective="iwae", k=50)),
]
TRAINING_CASES = [
    # (name, config overrides)
    ("vae_k1_L1", dict(layers=1, objective="vae", k=1)),
    ("vae_k1_L1_compiled", dict(layers=1, objective="vae", k=1, compile=True)),
    ("iwae_k5_L1", dict(layers=1, objective="iwae", k=5)),
    ("iwae_k5_L2", dict(layers=2, objective="iwae", k=5)),
    ("iwae_k50_L1", dict(layers=1, objective="iwae", k=50)),
    ("iwae_k50_L2", dict(layers=2, objective="iwae", k=50)),
    ("iwae_k50_L1_compiled", dict(layers=1, objective="iwae", k=50, compile=True)),
    ("iwae_k50_L2_compiled", dict(layers=2, objective="iwae", k=50, compile=True)),
    ("miwae_m4_k16_L1", dict(layers=1, objective="miwae", m=4, k=16)),
]


def matmul_peak(device: torch.device, seconds: float) -> float:
    """Best float32 GFLOP/s of a 2048^3 matmul over about `seconds`: one untimed warm-up, then
    timed matmuls until the time is up, at least one whatever `seconds` is, so the figure is
    always a rate of real work (a slow CPU may take longer than the window for one matmul)."""
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    sync(device)
    best, deadline = 0.0, time.perf_counter() + seconds
    while best == 0.0 or time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed > 0:
            best = max(best, 2 * n**3 / elapsed / 1e9)
    return best


def fraction_of_peak(gflops: float, peak: float) -> float:
    """`gflops` as a share of the measured peak; a peak that is not a positive finite rate is
    an error, never a division."""
    if not (math.isfinite(peak) and peak > 0):
        raise ValueError(
            f"matmul peak {peak!r} GFLOP/s is not a rate of real work; cannot express figures as a fraction of it"
        )
    return round(gflops / peak, 3)


def bench_training(name: str, overrides: dict, device: torch.device, steps: int, peak: float) -> dict:
    config = TrainConfig(**overrides)
    objective = config.build_objective()
    # compiled steps need a few hundred calls to settle
    seconds = training_step_seconds(config, device, steps, warmup=max(100, steps // 4)) * steps
    flops = 3 * 2 * config.build_model().multiply_adds(objective.num_samples) * config.batch_size * steps
    return {
        "figure": "train",
        "name": name,
        "batch": config.batch_size,
        "samples": objective.num_samples,
        "steps_per_s": round(steps / seconds, 1),
        "images_per_s": round(steps * config.batch_size / seconds, 1),
        "gflops": round(flops / seconds / 1e9, 1),
        "fraction_of_peak": fraction_of_peak(flops / seconds / 1e9, peak),
    }


def bench_against_bare_loop(
    name: str, overrides: dict, device: torch.device, rounds: int, seconds_per_round: float
) -> dict:
    """The library's training step rate as a ratio to the bare loop's (iwae_model.bare_loop), in
    alternating rounds so that a slow spell of a shared machine hits both: the median of the
    per-round ratios."""
    config = TrainConfig(**overrides)
    library = training_steps(config, device)
    torch.manual_seed(0)
    images = torch.rand(config.batch_size * BATCHES, 784, device=device)
    bare_model = BareIWAE(config.layers, config.build_objective().num_samples, device, config)
    generator = torch.Generator(device=device).manual_seed(0)
    bare = cycled(lambda grey: bare_model.step(grey, generator), images, config.batch_size, device)
    library(20)
    bare(20)
    steps = max(5, round(seconds_per_round / seconds_per_call(library, 10)))
    rounds_seen = []
    for index in range(rounds):
        if index % 2:
            bare_s, library_s = seconds_per_call(bare, steps), seconds_per_call(library, steps)
        else:
            library_s, bare_s = seconds_per_call(library, steps), seconds_per_call(bare, steps)
        rounds_seen.append((1 / library_s, 1 / bare_s, bare_s / library_s))
    library_rate, bare_rate, ratio = (statistics.median(column) for column in zip(*rounds_seen))
    return {
        "figure": "vs_bare_loop",
        "name": name,
        "library_steps_per_s": round(library_rate, 1),
        "bare_steps_per_s": round(bare_rate, 1),
        "ratio": round(ratio, 3),
        "ratio_range": [round(min(r[2] for r in rounds_seen), 3), round(max(r[2] for r in rounds_seen), 3)],
        "rounds": rounds,
        "steps_per_round": steps,
    }


def bench_evaluation(layers: int, device: torch.device, images: int, peak: float, k: int = 5000) -> dict:
    config = TrainConfig(layers=layers)
    seconds = likelihood_seconds_per_image(config, device, k, images) * images
    flops = 2 * config.build_model().multiply_adds(k) * images
    return {
        "figure": "evaluate",
        "name": f"nll_k{k}_L{layers}",
        "images": images,
        "images_per_s": round(images / seconds, 2),
        "test_set_minutes": round(10000 / (images / seconds) / 60, 2),
        "gflops": round(flops / seconds / 1e9, 1),
        "fraction_of_peak": fraction_of_peak(flops / seconds / 1e9, peak),
    }


def bench_diagnostics_overhead(layers: int, device: torch.device, images: int, rounds: int, k: int = 5000) -> dict:
    """The evaluation's time with the importance-sampling diagnostics (ESS, Pareto k̂) over its
    time without, minus 1: the median over alternating rounds."""
    config = TrainConfig(layers=layers)
    ratios = []
    for index in range(rounds):
        order = (True, False) if index % 2 == 0 else (False, True)
        seconds = {d: likelihood_seconds_per_image(config, device, k, images, diagnostics=d) for d in order}
        ratios.append(seconds[True] / seconds[False])
    return {
        "figure": "is_diagnostics_overhead",
        "name": f"nll_k{k}_L{layers}",
        "images": images,
        "rounds": rounds,
        "overhead": round(statistics.median(ratios) - 1, 4),
        "overhead_range": [round(min(ratios) - 1, 4), round(max(ratios) - 1, 4)],
    }


def bench_ais(layers: int, device: torch.device, images: int, steps: int, chains: int = 16) -> dict:
    """AIS + encoder at the evaluate CLI's defaults on random binary images."""
    seconds = images * ais_seconds_per_image(TrainConfig(layers=layers), device, steps, chains, images)
    return {
        "figure": "ais",
        "name": f"ais_encoder_s{steps}_c{chains}_L{layers}",
        "images": images,
        "steps": steps,
        "chains": chains,
        "leapfrog": LEAPFROG_STEPS,
        "images_per_s": round(images / seconds, 3),
        "seconds_per_image_per_1000_steps": round(seconds / images * 1000 / steps, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m iwae_model.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and images (under 3 minutes on 2 CPU cores)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except DeviceError as error:
        exit_with(error)
    pin_float32()
    steps = 1000 if args.quick else 3000
    image_batch = default_image_batch(device)  # whole batches: a partial one times launch latency on a GPU
    eval_images = image_batch * max(1, round((32 if args.quick else 200) / image_batch))
    peak_seconds = 2.0 if args.quick else 5.0

    def print_peak(when: str) -> float:
        peak = matmul_peak(device, peak_seconds)
        print(
            json.dumps(
                {
                    "figure": "matmul_peak",
                    "when": when,
                    "device": str(device),
                    "threads": torch.get_num_threads(),
                    "gflops": round(peak, 1),
                }
            ),
            flush=True,
        )
        return peak

    peak = print_peak("start")
    for name, overrides in TRAINING_CASES:
        print(json.dumps(bench_training(name, overrides, device, steps, peak)), flush=True)
    for name, overrides in BARE_LOOP_CASES:
        print(
            json.dumps(
                bench_against_bare_loop(
                    name, overrides, device, rounds=5 if args.quick else 9, seconds_per_round=0.4 if args.quick else 1.0
                )
            ),
            flush=True,
        )
    for layers in (1, 2):
        print(json.dumps(bench_evaluation(layers, device, eval_images, peak)), flush=True)
    for layers in (1, 2):
        print(
            json.dumps(bench_diagnostics_overhead(layers, device, image_batch, rounds=5 if args.quick else 9)),
            flush=True,
        )
    for layers in (1,) if args.quick else (1, 2):
        print(json.dumps(bench_ais(layers, device, image_batch, steps=20 if args.quick else 100)), flush=True)
    end = print_peak("end")
    if not 0.8 < end / peak < 1.25:
        print(
            f"warning: the matmul peak moved from {peak:.1f} to {end:.1f} GFLOP/s during the run (a shared or "
            f"throttled machine): the fractions above are not reliable; run again",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
