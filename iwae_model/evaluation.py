"""A trained model's test-set figures: the k=5000 NLL with its standard error and
importance-sampling diagnostics, the training objective's test bound, and active units (the
estimators themselves, and their memory use, are in likelihood.py)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields

import numpy as np

from .config import TrainConfig
from .data import Dataset
from .device import device_record, pin_float32
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
    comparable_to_papers: bool  # the evaluation protocol: the dataset's binarization, k >= 5000, the whole test set
    dataset: str  # the data evaluated on: its name, binarization and each file's SHA-256
    binarization: str
    data_files: dict[str, str]
    ess_mean: float  # effective sample size of the k weights, mean over images
    ess_median: float
    pareto_k_above: float  # share of images whose PSIS k̂ exceeds 0.7 (NaN for k < 25)
    pareto_k_max: float
    noise: str  # the q-noise stream (likelihood.noise_stream): equal for two models, paired noise
    per_image: dict[str, np.ndarray] = field(repr=False)  # image, log_likelihood, ess, pareto_k

    def summary(self) -> dict:
        """Every figure but the per-image arrays, JSON-ready."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "per_image"}


def comparable_to_papers(result: Evaluation, config: TrainConfig) -> bool:
    """Whether an evaluation of a model trained with `config` compares with the papers' tables:
    the papers' evaluation (the result's) of the papers' training (the config's: the dataset's
    binarization, the whole training set, all 3,280 passes)."""
    return result.comparable_to_papers and config.comparable_to_papers


def evaluate_model(
    model: IWAEModel,
    data: Dataset,
    objective: Objective,
    k: int = 5000,
    images: int | None = None,
    progress: bool = False,
) -> Evaluation:
    """The run's test-set figures, with Burda's fixed test binarization (seed 123; binarized_mnist's
    test set is the file's bits)."""
    pin_float32()
    start = time.perf_counter()
    x = data.binarized_once("test")[:images]
    device = x.device
    estimate = importance_sampling(model, x, k, progress=progress)
    ll, ess, pareto_k = (t.cpu().numpy() for t in (estimate.log_likelihood, estimate.ess, estimate.pareto_k))
    test_bound = bound(model, x, objective)
    units = burda_active_units(model, data)
    se = float(ll.std(ddof=1) / math.sqrt(len(ll))) if len(ll) > 1 else float("nan")
    fitted = pareto_k[np.isfinite(pareto_k)]
    return Evaluation(
        nll=float(-ll.mean()),
        nll_se=se,
        k=k,
        images=len(x),
        test_bound=float(test_bound.mean()),
        test_bound_name=repr(objective),
        active_units=units,
        seconds=time.perf_counter() - start,
        **device_record(device),
        comparable_to_papers=data.as_in_papers and len(x) == len(data.test) and k >= 5000,
        dataset=data.name,
        binarization=data.binarization,
        data_files=data.files,
        ess_mean=float(ess.mean()),
        ess_median=float(np.median(ess)),
        pareto_k_above=float((fitted > PARETO_K_THRESHOLD).mean()) if len(fitted) else float("nan"),
        pareto_k_max=float(fitted.max()) if len(fitted) else float("nan"),
        noise=noise_stream(model, k),
        per_image={"image": np.arange(len(x)), "log_likelihood": ll, "ess": ess, "pareto_k": pareto_k},
    )
