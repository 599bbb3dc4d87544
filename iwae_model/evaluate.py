"""python -m iwae_model.evaluate: a trained run's test-set figures (iwae_model/evaluation.py):
k=5000 NLL with its standard error, the training objective's test bound and active units; with
--ais, annealed importance sampling beside IS on the same test images, and with --bdmc, the
BDMC sandwich on images simulated from the model (iwae_model/ais.py, docs/ais.md).

    python -m iwae_model.evaluate RUN_DIR --k 5000 [--json]
    python -m iwae_model.evaluate RUN_DIR --images 100 --ais 1000 [--ais-chains 16] [--ais-start encoder|prior]
        [--bdmc 1000 --bdmc-images 100]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace

import numpy as np
import torch

from .ais import LEAPFROG_STEPS, STARTS, ais_beside_is, bdmc, mean_se
from .checkpoint import load_model
from .datasets import load_dataset
from .device import resolve_device
from .errors import IWAEError, exit_with
from .evaluation import Evaluation, comparable_to_papers, evaluate_model
from .importance import PARETO_K_THRESHOLD
from .models import IWAEModel
from .plugins import PluginError, add_plugin_flag, load_plugin

AIS_IMAGES = 100  # default --ais-images (at most --images) and --bdmc-images


def pareto_k_text(result: Evaluation) -> str:
    if not math.isfinite(result.pareto_k_max):
        return f"Pareto k̂ needs k >= 25 (k={result.k})"
    return (
        f"Pareto k̂ > {PARETO_K_THRESHOLD} (estimate unreliable) for {result.pareto_k_above:.1%} of images, "
        f"max k̂ {result.pareto_k_max:.2f}"
    )


def ais_figures(model: IWAEModel, x: torch.Tensor, is_ll: np.ndarray, args: argparse.Namespace) -> dict:
    """AIS on the test images x beside IS's per-image estimates `is_ll` of the same images: both
    NLLs, and the paired difference AIS - IS of log p(x) (mean and SE over images)."""
    comparison = ais_beside_is(model, x, is_ll, args.ais, args.ais_chains, args.ais_start, progress=True)
    return {**comparison.summary(), "k": args.k}


def bdmc_figures(model: IWAEModel, images: int, args: argparse.Namespace) -> dict:
    """BDMC on `images` simulated images: both bounds' means and the gap's (mean and SE)."""
    start = time.perf_counter()
    result = bdmc(model, images, args.bdmc, args.ais_chains, args.ais_start, progress=True)
    lower, lower_se = mean_se(result.lower.cpu().numpy())
    upper, upper_se = mean_se(result.upper.cpu().numpy())
    gap, gap_se = mean_se(result.gap.cpu().numpy())
    return {
        "steps": args.bdmc,
        "chains": args.ais_chains,
        "start": args.ais_start,
        "leapfrog": LEAPFROG_STEPS,
        "images": images,
        "lower": lower,
        "lower_se": lower_se,
        "upper": upper,
        "upper_se": upper_se,
        "gap": gap,
        "gap_se": gap_se,
        "acceptance_forward": float(result.forward.acceptance.mean()),
        "acceptance_reverse": float(result.reverse_acceptance.mean()),
        "seconds": time.perf_counter() - start,
    }


def ais_text(figures: dict) -> str:
    how = f"{figures['steps']} distributions, {figures['chains']} chains, {figures['start']} start"
    return (
        f"AIS ({how}) on the first {figures['images']} test images: NLL {figures['nll']:.3f} ± "
        f"{figures['nll_se']:.3f}; IS (k={figures['k']}) on the same images: NLL {figures['is_nll']:.3f} ± "
        f"{figures['is_nll_se']:.3f}\n"
        f"AIS - IS in log p(x): {figures['ais_minus_is']:+.3f} ± {figures['ais_minus_is_se']:.3f} nats (paired, "
        f"mean ± SE over images; > 0: IS underestimates log p(x) by at least about this); HMC acceptance "
        f"{figures['acceptance']:.2f}, chains' log-weight SD median {figures['log_weight_sd_median']:.2f} nats, "
        f"{figures['seconds']:.1f} s"
    )


def bdmc_text(figures: dict) -> str:
    how = f"{figures['steps']} distributions, {figures['chains']} chains, {figures['start']} start"
    return (
        f"BDMC ({how}) on {figures['images']} images simulated from the model: log p(x) between "
        f"{figures['lower']:.3f} ± {figures['lower_se']:.3f} (forward AIS) and {figures['upper']:.3f} ± "
        f"{figures['upper_se']:.3f} (reverse AIS); gap {figures['gap']:.3f} ± {figures['gap_se']:.3f} nats "
        f"(bounds AIS's error with this schedule on such images), {figures['seconds']:.1f} s"
    )


def check_ais_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse AIS and BDMC settings that cannot run, before anything is loaded."""
    for flag, value, fix in [
        ("--images", args.images, "evaluate at least one image"),
        ("--ais", args.ais, "the number of annealing distributions, e.g. --ais 1000"),
        ("--ais-images", args.ais_images, "AIS needs at least one image"),
        ("--ais-chains", args.ais_chains, "e.g. --ais-chains 16"),
        ("--bdmc", args.bdmc, "the number of annealing distributions, e.g. --bdmc 1000"),
        ("--bdmc-images", args.bdmc_images, "BDMC needs at least one simulated image"),
    ]:
        if value is not None and value < 1:
            parser.error(f"{flag} {value}: must be at least 1 ({fix})")
    if args.ais_images is not None and args.ais is None:
        parser.error(f"--ais-images {args.ais_images}: only used with --ais STEPS; add --ais or leave --ais-images out")
    if args.bdmc_images is not None and args.bdmc is None:
        parser.error(
            f"--bdmc-images {args.bdmc_images}: only used with --bdmc STEPS; add --bdmc or leave --bdmc-images out"
        )


def check_ais_images(parser: argparse.ArgumentParser, images: int, test_images: int, evaluated: int) -> None:
    """--ais-images against the test set and the images IS evaluates (AIS is compared on those)."""
    if images > test_images:
        parser.error(f"--ais-images {images}: the test set has {test_images} images; pass at most {test_images}")
    if images > evaluated:
        parser.error(
            f"--ais-images {images}: more than the {evaluated} test images IS evaluates (--images); AIS is "
            f"compared with IS on the same images: pass --images {images} or fewer --ais-images"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m iwae_model.evaluate",
        description="Estimate test log-likelihood (NLL in nats, Burda et al.'s k=5000 protocol), the "
        "test bound of the training objective, and active units of a trained run.",
    )
    parser.add_argument("run_dir", help="a run directory written by python -m iwae_model.train (or its checkpoint.pt)")
    add_plugin_flag(parser)
    parser.add_argument(
        "--k", type=int, default=5000, help="importance samples per image (default 5000, as the papers)"
    )
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help="evaluate the first N test images only (default: all 10,000; a subset is not comparable to the papers)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="data folder, every dataset's files (default: $IWAE_DATA_DIR, then ~/.cache/iwae-sweep/data)",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--ais",
        type=int,
        metavar="STEPS",
        help="also estimate log p(x) by annealed importance sampling with STEPS distributions (Wu et al.: "
        "1,000 with --ais-start encoder, 10,000 from the prior) on the first --ais-images test images, "
        "beside IS at --k on the same images",
    )
    parser.add_argument(
        "--ais-images",
        type=int,
        metavar="N",
        help=f"test images for --ais (default: {AIS_IMAGES}, or --images if fewer)",
    )
    parser.add_argument(
        "--ais-chains",
        type=int,
        default=16,
        metavar="C",
        help="AIS chains per image, for --ais and --bdmc (default 16)",
    )
    parser.add_argument(
        "--ais-start",
        choices=STARTS,
        default="encoder",
        help="where AIS chains start, for --ais and --bdmc: the encoder q(h|x) (default) or the prior p(h)",
    )
    parser.add_argument(
        "--bdmc",
        type=int,
        metavar="STEPS",
        help="also run BDMC with STEPS distributions on --bdmc-images images simulated from the model: "
        "a lower and an upper bound of log p(x) whose gap bounds the error of AIS with that schedule",
    )
    parser.add_argument(
        "--bdmc-images", type=int, metavar="N", help=f"simulated images for --bdmc (default {AIS_IMAGES})"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object on stdout instead of text (progress still goes to stderr)",
    )
    args = parser.parse_args(argv)
    try:
        for spec in args.plugin:
            load_plugin(spec)
    except PluginError as error:
        parser.error(str(error))
    if args.k < 1:
        parser.error(f"--k {args.k}: must be at least 1")
    check_ais_flags(parser, args)
    try:
        device = resolve_device(args.device)
        model, config, _ = load_model(args.run_dir, device)
        data = load_dataset(config.dataset, args.data_dir, device, config.binarization)
    except IWAEError as error:
        exit_with(error)
    evaluated = min(args.images or len(data.test), len(data.test))
    if args.ais_images is not None:
        check_ais_images(parser, args.ais_images, len(data.test), evaluated)
    result = evaluate_model(model, data, config.build_objective(), args.k, args.images, progress=True)
    result = replace(result, comparable_to_papers=comparable_to_papers(result, config))
    extra = {}
    if args.ais is not None:
        # IS noise is drawn per image (likelihood.evaluation_noise): the first N images' IS estimates
        # are those the evaluation above made, whatever its --images.
        n = args.ais_images or min(AIS_IMAGES, evaluated)
        is_ll = result.per_image["log_likelihood"][:n]
        extra["ais"] = ais_figures(model, data.binarized_once("test")[:n], is_ll, args)
    if args.bdmc is not None:
        extra["bdmc"] = bdmc_figures(model, args.bdmc_images or AIS_IMAGES, args)
    if args.json:
        print(json.dumps({"run_dir": str(args.run_dir), "config": config.to_dict(), **result.summary(), **extra}))
        return
    note = (
        ""
        if result.comparable_to_papers
        else "  (not comparable to the papers: short schedule, subset of the data, k < 5000 "
        "or non-dynamic binarization)"
    )
    print(
        f"{config.label()}: test NLL {result.nll:.3f} ± {result.nll_se:.3f} nats (k={result.k}, "
        f"{result.images} images){note}"
    )
    print(f"test {result.test_bound_name} bound: {result.test_bound:.3f} nats")
    print(f"active units per layer: {'+'.join(map(str, result.active_units))}")
    print(
        f"importance sampling: ESS mean {result.ess_mean:.1f}, median {result.ess_median:.1f} of k={result.k}; "
        f"{pareto_k_text(result)}"
    )
    on = (
        f"{result.device} ({result.gpu_name}, compute capability {result.gpu_capability})"
        if result.gpu_name
        else result.device
    )
    print(f"{result.seconds:.1f} s on {on}, float32 {result.float32}")
    if "ais" in extra:
        print(ais_text(extra["ais"]))
    if "bdmc" in extra:
        print(bdmc_text(extra["bdmc"]))


if __name__ == "__main__":
    main()
