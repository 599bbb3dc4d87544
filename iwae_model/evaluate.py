"""python -m iwae_model.evaluate: a trained run's test-set figures (iwae_model/evaluation.py):
k=5000 NLL with its standard error, the training objective's test bound and active units.

    python -m iwae_model.evaluate RUN_DIR --k 5000 [--json]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

from .checkpoint import load_model
from .datasets import load_dataset
from .device import resolve_device
from .errors import IWAEError
from .evaluation import Evaluation, evaluate_model
from .importance import PARETO_K_THRESHOLD


def pareto_k_text(result: Evaluation) -> str:
    if not math.isfinite(result.pareto_k_max):
        return f"Pareto k̂ needs k >= 25 (k={result.k})"
    return (
        f"Pareto k̂ > {PARETO_K_THRESHOLD} (estimate unreliable) for {result.pareto_k_above:.1%} of images, "
        f"max k̂ {result.pareto_k_max:.2f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m iwae_model.evaluate",
        description="Estimate test log-likelihood (NLL in nats, Burda et al.'s k=5000 protocol), the "
        "test bound of the training objective, and active units of a trained run.",
    )
    parser.add_argument("run_dir", help="a run directory written by python -m iwae_model.train (or its checkpoint.pt)")
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
        "--json",
        action="store_true",
        help="print one JSON object on stdout instead of text (progress still goes to stderr)",
    )
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k {args.k}: must be at least 1")
    try:
        device = resolve_device(args.device)
        model, config, _ = load_model(args.run_dir, device)
        data = load_dataset(config.dataset, args.data_dir, device, config.binarization)
    except IWAEError as error:
        parser.exit(1, f"error: {error}\n")
    result = evaluate_model(model, data, config.build_objective(), args.k, args.images, progress=True)
    # The papers' numbers also need the papers' training: all 59,600 images, all 3,280 passes.
    result = replace(result, comparable_to_papers=result.comparable_to_papers and config.comparable_to_papers)
    if args.json:
        print(json.dumps({"run_dir": str(args.run_dir), "config": config.to_dict(), **result.summary()}))
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


if __name__ == "__main__":
    main()
