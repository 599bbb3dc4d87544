"""One training run's configuration: what is trained, on what data, with which schedule."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .models import IWAEModel, build_model
from .objectives import ESTIMATORS, OBJECTIVES, GradientEstimator, Objective, build_estimator, build_objective

FULL_SCHEDULE_PASSES = 3280  # sum of 3^i for i = 0..7
SCHEDULES = ("compressed", "truncated", "constant")
BINARIZATIONS = ("dynamic", "static", "threshold")


@dataclass(frozen=True)
class TrainConfig:
    """Defaults are Burda et al.'s protocol (IWAE, k=5, 1 layer, full schedule).

    adam_beta1: textbook 0.9 by default (the Cambridge replication's reading of the paper); the
    authors' code used 0.99 (and an Adam whose second moment starts at 1 instead of 0, which
    torch's Adam does not reproduce).
    Losses are summed, not averaged, over the batch, as in the authors' code: with eps=1e-4
    added to sqrt(v), the gradient's scale matters."""

    layers: int = 1
    objective: str = "iwae"
    k: int = 5
    m: int = 1
    beta: float = 0.5
    estimator: str = "reparam"
    passes: int = FULL_SCHEDULE_PASSES
    schedule: str = "compressed"  # how passes < 3280 map onto Burda's 8 stages (constant: lr throughout); see train.stage_boundaries
    batch_size: int = 20
    lr: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-4
    seed: int = 0
    binarization: str = "dynamic"
    train_images: int | None = None  # first N training images only (quick runs, tests)
    test_images: int | None = None  # per-epoch test bound on the first N test images
    eval_every: int = 1  # epochs between test-bound evaluations (the last epoch always has one)
    nll_every: int = 0  # epochs between k-sample NLL estimates on `nll_images` test images; 0 = never
    nll_k: int = 5000
    nll_images: int = 500
    # Gradient SNR (Rainforth et al. 2018) every `snr_every` passes (and at the last; 0: never):
    # `snr_draws` gradient draws on the first `snr_images` training images, binarized once.
    snr_every: int = 0
    snr_draws: int = 100
    snr_images: int = 100
    # Continue another run (Burda et al.'s Table 2): start from the final weights of the run at
    # `init_from` (a run directory, checkpoint file or checkpoint URI), labelled `init_label`;
    # its Adam state too with `init_optimizer`, else a fresh optimizer and schedule.
    init_from: str | None = None
    init_label: str | None = None
    init_optimizer: bool = False
    latent_dims: tuple[int, ...] | None = None
    hidden_dims: tuple[int, ...] | None = None
    # torch.compile the surrogate loss (forward and backward): at batch 20 most of a small
    # model's step is per-op Python overhead, which this removes, for ~10 s of compilation.
    # Results differ from eager mode in the last bits.
    compile: bool = False

    def __post_init__(self) -> None:
        # Configurations also come from YAML files and checkpoints: every field's type is
        # checked here, so a bad value is named before any training starts.
        def fail(name: str, expected: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r}: {expected}")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for name in ("layers", "k", "m", "passes", "batch_size", "eval_every", "nll_k", "nll_images", "snr_images"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise fail(name, "must be a positive integer")
        for name in ("train_images", "test_images"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise fail(name, "must be a positive integer, or null for all images")
        for name in ("nll_every", "snr_every"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise fail(name, "must be an integer >= 0 (0: never)")
        if not is_int(self.snr_draws) or self.snr_draws < 2:
            raise fail("snr_draws", "must be an integer >= 2 (the SNR is a mean over a standard deviation of draws)")
        if not is_int(self.seed):
            raise fail("seed", "must be an integer")
        for name in ("beta", "lr", "adam_beta1", "adam_beta2", "adam_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise fail(name, "must be a finite number")
        for name in ("lr", "adam_eps"):
            if not getattr(self, name) > 0:
                raise fail(name, "must be > 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise fail(name, "must lie in [0, 1)")
        for name, choices in (("objective", OBJECTIVES), ("estimator", ESTIMATORS), ("schedule", SCHEDULES),
                              ("binarization", BINARIZATIONS)):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in choices:
                raise fail(name, f"choose one of {', '.join(choices)}")
        for name in ("compile", "init_optimizer"):
            if not isinstance(getattr(self, name), bool):
                raise fail(name, "must be true or false")
        for name in ("init_from", "init_label"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise fail(name, "must be a non-empty string, or null")
        if self.init_from is None and (self.init_label is not None or self.init_optimizer):
            raise ValueError("init_label and init_optimizer describe a continued run: they need init_from")
        for name in ("latent_dims", "hidden_dims"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (list, tuple)) or not value or not all(is_int(v) and v > 0 for v in value):
                raise fail(name, "must be a list of positive integers, or null for Burda's sizes")
            object.__setattr__(self, name, tuple(value))  # a YAML list and a checkpoint's tuple compare equal
            if len(value) != self.layers:
                raise fail(name, f"needs one size per stochastic layer ({self.layers})")
        if self.train_images is not None and self.train_images < self.batch_size:
            raise ValueError(f"train_images={self.train_images}: need at least one batch of {self.batch_size}")
        self.build_objective()
        self.build_estimator()

    @property
    def comparable_to_papers(self) -> bool:
        """Trained with the papers' protocol: dynamic binarization, all 59,600 training images,
        the full 3,280-pass schedule."""
        return self.binarization == "dynamic" and self.train_images is None and self.passes == FULL_SCHEDULE_PASSES

    def build_objective(self) -> Objective:
        return build_objective(self.objective, self.k, self.m, self.beta)

    def build_estimator(self) -> GradientEstimator:
        return build_estimator(self.estimator, self.layers)

    def build_model(self, train_mean=None) -> IWAEModel:
        return build_model(self.layers, self.latent_dims, self.hidden_dims, train_mean=train_mean)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(values) - known))
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def label(self) -> str:
        """A short name that says the configuration, e.g. iwae_L2_M1_K50_s0."""
        extra = f"_b{self.beta:g}" if self.objective == "ciwae" else ""
        extra += f"_{self.estimator}" if self.estimator != "reparam" else ""
        parent = f"_from_{self.init_label}" if self.init_label else "_continued" if self.init_from else ""
        return f"{self.objective}_L{self.layers}_M{self.m}_K{self.k}{extra}_s{self.seed}{parent}"

