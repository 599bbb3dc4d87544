"""A trained run's test-set figures: k=5000 NLL with its standard error, the training
objective's test bound (e.g. IWAE_{M,K}) and active units.

    python -m iwae_model.evaluate RUN_DIR --k 5000 [--json]

The estimators themselves live in `likelihood.py`; memory use is documented there.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field, fields, replace

import numpy as np

from .checkpoint import load_model
from .data import MNIST, MNISTError, load_mnist
from .device import device_record, pin_float32, resolve_device
from .importance import PARETO_K_THRESHOLD
from .likelihood import bound, burda_active_units, importance_sampling, noise_stream
from .models import IWAEModel
from .objectives import Objective


@dataclass
class Evaluation:
    nll: float  # nats, -mean log p(x) over the images
    nll_se: float  # standard error of that mean over images
    k: int
    images: int
    test_bound: float  # mean training-objective bound (e.g. IWAE_{M,K}) on the same images
    test_bound_name: str
    active_units: list[int]
    seconds: float
    device: str
    float32: str  # the float32 precision of matmuls and convolutions (device.float32_precision)
    gpu_name: str | None  # on CUDA, the GPU's name and compute capability
    gpu_capability: str | None
    comparable_to_papers: bool  # the evaluation protocol: dynamic binarization, k >= 5000, all 10,000 test images
    ess_mean: float  # effective sample size of the k weights, mean over images
    ess_median: float
    pareto_k_above: float  # share of images whose PSIS k̂ exceeds 0.7 (NaN for k < 25)
    pareto_k_max: float
    noise: str  # the q-noise stream (likelihood.noise_stream): equal for two models, paired noise
    per_image: dict[str, np.ndarray] = field(repr=False)  # image, log_likelihood, ess, pareto_k

    def summary(self) -> dict:
        """Every figure but the per-image arrays, JSON-ready."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "per_image"}


def evaluate_model(
    model: IWAEModel,
    data: MNIST,
    objective: Objective,
    k: int = 5000,
    images: int | None = None,
    progress: bool = False,
) -> Evaluation:
    """The run's test-set figures, with Burda's fixed test binarization (seed 123)."""
    pin_float32()
    start = time.perf_counter()
    x = data.fixed("test")[:images]
    device = x.device
    estimate = importance_sampling(model, x, k, progress=progress)
    ll, ess, pareto_k = (t.cpu().numpy() for t in (estimate.log_likelihood, estimate.ess, estimate.pareto_k))
    test_bound = bound(model, x, objective)
    units = burda_active_units(model, data)
    se = float(ll.std(ddof=1) / math.sqrt(len(ll))) if len(ll) > 1 else float("nan")
    fitted = pareto_k[np.isfinite(pareto_k)]
    return Evaluation(
        nll=float(-ll.mean()), nll_se=se, k=k, images=len(x),
        test_bound=float(test_bound.mean()), test_bound_name=repr(objective),
        active_units=units, seconds=time.perf_counter() - start, **device_record(device),
        comparable_to_papers=data.binarization == "dynamic" and len(x) == len(data.test) and k >= 5000,
        ess_mean=float(ess.mean()), ess_median=float(np.median(ess)),
        pareto_k_above=float((fitted > PARETO_K_THRESHOLD).mean()) if len(fitted) else float("nan"),
        pareto_k_max=float(fitted.max()) if len(fitted) else float("nan"),
        noise=noise_stream(model, k),
        per_image={"image": np.arange(len(x)), "log_likelihood": ll, "ess": ess, "pareto_k": pareto_k},
    )


def pareto_k_text(result: Evaluation) -> str:
    if not math.isfinite(result.pareto_k_max):
        return f"Pareto k̂ needs k >= 25 (k={result.k})"
    return (f"Pareto k̂ > {PARETO_K_THRESHOLD} (estimate unreliable) for {result.pareto_k_above:.1%} of images, "
            f"max k̂ {result.pareto_k_max:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m iwae_model.evaluate",
        description="Estimate test log-likelihood (NLL in nats, Burda et al.'s k=5000 protocol), the "
                    "test bound of the training objective, and active units of a trained run.")
    parser.add_argument("run_dir", help="a run directory written by python -m iwae_model.train (or its checkpoint.pt)")
    parser.add_argument("--k", type=int, default=5000, help="importance samples per image (default 5000, as the papers)")
    parser.add_argument("--images", type=int, default=None,
                        help="evaluate the first N test images only (default: all 10,000; a subset is not comparable to the papers)")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: $IWAE_DATA_DIR, then ~/.cache/iwae-sweep/mnist)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of text (progress still goes to stderr)")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k {args.k}: must be at least 1")
    try:
        device = resolve_device(args.device)
        model, config, _ = load_model(args.run_dir, device)
        data = load_mnist(args.data_dir, device, config.binarization)
    except (FileNotFoundError, ValueError, MNISTError) as error:
        parser.exit(1, f"error: {error}\n")
    result = evaluate_model(model, data, config.build_objective(), args.k, args.images, progress=True)
    # The papers' numbers also need the papers' training: all 59,600 images, all 3,280 passes.
    result = replace(result, comparable_to_papers=result.comparable_to_papers and config.comparable_to_papers)
    if args.json:
        print(json.dumps({"run_dir": str(args.run_dir), "config": config.to_dict(), **result.summary()}))
        return
    note = "" if result.comparable_to_papers else "  (not comparable to the papers: short schedule, subset of the data, k < 5000 or non-dynamic binarization)"
    print(f"{config.label()}: test NLL {result.nll:.3f} ± {result.nll_se:.3f} nats (k={result.k}, "
          f"{result.images} images){note}")
    print(f"test {result.test_bound_name} bound: {result.test_bound:.3f} nats")
    print(f"active units per layer: {'+'.join(map(str, result.active_units))}")
    print(f"importance sampling: ESS mean {result.ess_mean:.1f}, median {result.ess_median:.1f} of k={result.k}; "
          f"{pareto_k_text(result)}")
    on = f"{result.device} ({result.gpu_name}, compute capability {result.gpu_capability})" if result.gpu_name else result.device
    print(f"{result.seconds:.1f} s on {on}, float32 {result.float32}")


if __name__ == "__main__":
    main()
