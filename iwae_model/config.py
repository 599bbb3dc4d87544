"""One training run's configuration: what is trained, on what data, with which schedule."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import BINARIZATIONS, FIXED
from .datasets import DATASETS
from .models import IWAEModel, build_model
from .objectives import (
    ESTIMATORS,
    OBJECTIVES,
    RESERVED_NAMES,
    GradientEstimator,
    Objective,
    build_estimator,
    build_objective,
    parameters,
)

FULL_SCHEDULE_PASSES = 3280  # sum of 3^i for i = 0..7
SCHEDULES = ("compressed", "truncated", "constant")


def setting(default, help: str, step_cost: bool = True, **argparse_options):
    """A TrainConfig field with its command-line help (the train CLI is made from the fields).
    `step_cost`: whether it can change the work of one optimizer step or of one evaluated image
    (a sweep's plan times one configuration for all that differ only in settings that cannot)."""
    return field(default=default, metadata={"help": help, "step_cost": step_cost, **argparse_options})


@dataclass(frozen=True, init=False)
class TrainConfig:
    """Defaults are Burda et al.'s protocol (IWAE, k=5, 1 layer, full schedule).

    Besides its fields it holds every registered objective's parameters (objectives.Parameter,
    e.g. CIWAE's beta), each at its default unless given: keyword arguments and attributes like
    the fields (`TrainConfig(objective="ciwae", beta=0.3).beta`), flat in `to_dict`.

    adam_beta1: textbook 0.9 by default (the Cambridge replication's reading of the paper); the
    authors' code used 0.99 (and an Adam whose second moment starts at 1 instead of 0, which
    torch's Adam does not reproduce).
    Losses are summed, not averaged, over the batch, as in the authors' code: with eps=1e-4
    added to sqrt(v), the gradient's scale matters."""

    layers: int = setting(1, "stochastic layers (Burda's architectures: 1 or 2)", choices=(1, 2))
    objective: str = setting(
        "iwae",
        "vae = k-sample Monte-Carlo ELBO; miwae/piwae are Rainforth et al.'s (M, K) objectives; "
        "vr is Li & Turner's Renyi bound, rws reweighted wake-sleep (objectives.OBJECTIVES)",
    )
    k: int = setting(5, "importance samples K (per group for miwae/piwae)")
    m: int = setting(1, "groups M for miwae/piwae (vae uses M*K samples)")
    estimator: str | None = setting(
        None,
        "encoder gradient: "
        + ", ".join(f"{e.name}, {e.help}" for e in ESTIMATORS.values())
        + "; default: the objective's own (wake for rws, else reparam)",
    )
    passes: int = setting(
        FULL_SCHEDULE_PASSES,
        f"passes over the training set; fewer than {FULL_SCHEDULE_PASSES} compresses the schedule proportionally",
        step_cost=False,
    )
    schedule: str = setting(
        "compressed",
        "how passes < 3280 map onto Burda's 8 stages: compressed keeps every "
        "stage's share; truncated runs the first N passes of the full schedule; "
        "constant holds --lr throughout",
        choices=SCHEDULES,
        step_cost=False,
    )
    batch_size: int = setting(20, "images per optimizer step")
    lr: float = setting(1e-3, "learning rate of stage 0", step_cost=False)
    adam_beta1: float = setting(
        0.9,
        "Adam beta1: 0.9 is textbook Adam (and the Cambridge replication's reading of "
        "the paper); the authors' code used 0.99",
        step_cost=False,
    )
    adam_beta2: float = setting(0.999, "Adam beta2", step_cost=False)
    adam_eps: float = setting(1e-4, "Adam epsilon (Burda's 1e-4)", step_cost=False)
    seed: int = setting(0, "seed of the weights and of the training noise", step_cost=False)
    dataset: str = setting(
        "mnist",
        "mnist and omniglot: grey levels, binarized as --binarization says; "
        "binarized_mnist: Larochelle & Murray's fixed binarization (data.DATASETS; plugins add theirs)",
    )
    binarization: str | None = setting(
        None,
        "how grey-level datasets (mnist, omniglot) become binary: dynamic (the default) is the papers' "
        "protocol, static/threshold are NOT comparable to the papers; a binary dataset's bits are used "
        "as they are: fixed, its only (and default) binarization (binarized_mnist)",
        choices=(*BINARIZATIONS, FIXED),
    )
    train_images: int | None = setting(None, "train on the first N images only (not comparable)", step_cost=False)
    test_images: int | None = setting(None, "per-pass test bound on the first N test images only", step_cost=False)
    eval_every: int = setting(1, "passes between test-bound evaluations (the last pass always has one)")
    nll_every: int = setting(
        0, "passes between k-sample NLL estimates on --nll-images test images (0: never)", step_cost=False
    )
    nll_k: int = setting(5000, "importance samples of those NLL estimates")
    nll_images: int = setting(500, "test images of those NLL estimates")
    valid_ll_k: int = setting(
        0,
        "importance samples of a log-likelihood estimate on the validation images every pass "
        "(valid_ll: ranks trials of different objectives, K or M fairly; 0: never)",
    )
    snr_every: int = setting(
        0,
        "passes between gradient-SNR measurements (Rainforth et al. 2018; and at the last; 0: never)",
        step_cost=False,
    )
    snr_draws: int = setting(100, "gradient draws per SNR measurement")
    snr_images: int = setting(100, "the SNR's fixed minibatch: the first N training images, binarized once")
    init_from: str | None = setting(
        None,
        "start from this run's final weights (a run directory or checkpoint "
        "file; Burda's Table 2: with --lr 1e-4 --passes 2187 "
        "--schedule constant); the optimizer starts fresh unless "
        "--init-optimizer",
        metavar="RUN_DIR",
        step_cost=False,
    )
    init_label: str | None = setting(
        None,
        "the label of the run this one continues (read from init_from's checkpoint; a sweep's second-stage "
        "trial has it before its parent's checkpoint is known, and init_from once it is)",
        step_cost=False,
    )
    init_optimizer: bool = setting(False, "with --init-from: also continue its Adam state", step_cost=False)
    latent_dims: tuple[int, ...] | None = setting(None, "latent units per stochastic layer (default: Burda's)")
    hidden_dims: tuple[int, ...] | None = setting(None, "hidden units per stochastic layer (default: Burda's)")
    # At batch 20 most of a small model's step is per-op Python overhead, which compiling removes.
    compile: bool = setting(
        False,
        "torch.compile the surrogate loss, forward and backward: faster small-batch steps "
        "after ~10 s of compilation; results differ from eager mode in the last bits",
    )

    # Every registered objective's parameter values, in OBJECTIVES' order (see the docstring).
    params: tuple[tuple[str, float], ...] = ()

    def __init__(self, **values: Any) -> None:
        declared = parameters()
        given = dict(values.pop("params", ()))  # dataclasses.replace passes them back
        given.update({name: values.pop(name) for name in list(values) if name in declared})
        known = [f.name for f in dataclasses.fields(self) if f.name != "params"]
        unknown = sorted(map(str, (set(values) - set(known)) | (set(given) - set(declared))))
        if unknown:
            raise ValueError(
                f"unknown training setting(s) {unknown}; known: {sorted([*known, *declared])} (an objective "
                f"plugin's parameter is known once its file is loaded: --plugin)"
            )
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, values.get(f.name, f.default))
        object.__setattr__(self, "params", tuple((name, given.get(name, p.default)) for name, p in declared.items()))
        self.__post_init__()

    def __getattr__(self, name: str) -> Any:
        # Only reached where no field has the name: an objective's parameter.
        for key, value in self.__dict__.get("params", ()):
            if key == name:
                return value
        raise AttributeError(f"TrainConfig has no setting {name!r}")

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
        for name in ("nll_every", "snr_every", "valid_ll_k"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise fail(name, "must be an integer >= 0 (0: never)")
        if not is_int(self.snr_draws) or self.snr_draws < 2:
            raise fail("snr_draws", "must be an integer >= 2 (the SNR is a mean over a standard deviation of draws)")
        if not is_int(self.seed):
            raise fail("seed", "must be an integer")
        for name in ("lr", "adam_beta1", "adam_beta2", "adam_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise fail(name, "must be a finite number")
        for name in ("lr", "adam_eps"):
            if not getattr(self, name) > 0:
                raise fail(name, "must be > 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise fail(name, "must lie in [0, 1)")
        for name, choices in (
            ("objective", OBJECTIVES),
            ("schedule", SCHEDULES),
            ("dataset", tuple(DATASETS)),
        ):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in choices:
                raise fail(name, f"choose one of {', '.join(choices)}")
        for name in ("compile", "init_optimizer"):
            if not isinstance(getattr(self, name), bool):
                raise fail(name, "must be true or false")
        for name in ("init_from", "init_label"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise fail(name, "must be a non-empty string, or null")
        objective = OBJECTIVES[self.objective]
        if self.estimator is None:
            object.__setattr__(self, "estimator", objective.default_estimator)
        if self.estimator not in objective.estimators:
            known = self.estimator in ESTIMATORS
            raise fail(
                "estimator",
                f"objective {self.objective!r} supports {', '.join(objective.estimators)}"
                if known
                else f"choose one of {', '.join(ESTIMATORS)}",
            )
        declared = parameters()
        for name, value in self.params:
            declared[name].check(value)
        own = DATASETS[self.dataset].binarizations()
        if self.binarization is None or (self.binarization == "dynamic" and own == (FIXED,)):
            # A binary dataset's "dynamic": what configurations written before `fixed` existed say.
            object.__setattr__(self, "binarization", own[0])
        if self.binarization not in own:
            raise fail(
                "binarization",
                f"{self.dataset} is binary already (its files' bits are used as they are); leave binarization out"
                if own == (FIXED,)
                else f"choose one of {', '.join(own)}",
            )
        if self.init_from is None and self.init_optimizer:
            raise ValueError("init_optimizer continues the Adam state of init_from's run: it needs init_from")
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
        """Trained with the papers' protocol: the dataset's own binarization (dynamic; a binary
        dataset's fixed bits), the whole training set, the full 3,280-pass schedule."""
        papers = self.binarization == DATASETS[self.dataset].binarizations()[0]
        return papers and self.train_images is None and self.passes == FULL_SCHEDULE_PASSES

    def build_objective(self) -> Objective:
        own = {p.name: getattr(self, p.name) for p in OBJECTIVES[self.objective].parameters}
        return build_objective(self.objective, self.k, self.m, **own)

    def build_estimator(self) -> GradientEstimator:
        return build_estimator(self.estimator, self.layers)

    @property
    def pixels(self) -> int:
        """Pixels per image of its dataset: the model's input size."""
        height, width = DATASETS[self.dataset].shape
        return height * width

    def build_model(self, train_mean: torch.Tensor | None = None) -> IWAEModel:
        """The model for its dataset's images; given the training set's mean, its output bias
        starts from it."""
        return build_model(self.layers, self.latent_dims, self.hidden_dims, x_dim=self.pixels, train_mean=train_mean)

    def to_dict(self) -> dict:
        """Every setting by name: the fields, the objective's own parameters, and any other
        objective's parameter set away from its default (a checkpoint of a built-in objective
        trained beside a plugin's then loads without that plugin)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "params"}
        own = {p.name for p in OBJECTIVES[self.objective].parameters}
        declared = parameters()
        return {**fields, **{k: v for k, v in self.params if k in own or v != declared[k].default}}

    def with_changes(self, **changes: Any) -> TrainConfig:
        """This configuration with `changes`. Where they change the objective but not the
        estimator, and this one trains by its objective's own, so does the new one (RWS by wake)."""
        values = self.to_dict()
        same = self.estimator == OBJECTIVES[self.objective].default_estimator
        if "objective" in changes and "estimator" not in changes and same:
            values["estimator"] = None
        return TrainConfig(**{**values, **changes})

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        return cls(**values)

    def label(self) -> str:
        """A short name that says the configuration, e.g. iwae_L2_M1_K50_s0 (on MNIST), or
        omniglot_iwae_L2_M1_K50_s0."""
        objective = OBJECTIVES[self.objective]
        extra = "".join(f"_{p.label}{getattr(self, p.name):g}" for p in objective.parameters)
        extra += f"_{self.estimator}" if self.estimator != objective.default_estimator else ""
        parent = f"_from_{self.init_label}" if self.init_label else "_continued" if self.init_from else ""
        dataset = "" if self.dataset == "mnist" else f"{self.dataset}_"
        return f"{dataset}{self.objective}_L{self.layers}_M{self.m}_K{self.k}{extra}_s{self.seed}{parent}"


# No objective's parameter may take a field's name (objectives._register checks plugins').
RESERVED_NAMES.update(f.name for f in dataclasses.fields(TrainConfig))


@dataclass(frozen=True)
class Setting:
    """One training setting as the interfaces made from it need it: a TrainConfig field or a
    registered objective's parameter; `options` are its argparse keywords (choices, metavar)."""

    name: str
    type: str  # the annotation as text, e.g. "int | None"
    help: str
    default: Any
    options: dict[str, Any]
    step_cost: bool  # see `setting`; objectives' parameters are taken not to change a step's work


def settings() -> list[Setting]:
    """Every training setting: TrainConfig's fields, then the registered objectives' parameters."""
    choices = {"objective": list(OBJECTIVES), "estimator": list(ESTIMATORS), "dataset": list(DATASETS)}  # plugins add
    fields = [
        Setting(
            f.name,
            f.type,
            f.metadata["help"],
            f.default,
            {
                **{k: v for k, v in f.metadata.items() if k not in ("help", "step_cost")},
                **({"choices": choices[f.name]} if f.name in choices else {}),
            },
            f.metadata["step_cost"],
        )
        for f in dataclasses.fields(TrainConfig)
        if f.name != "params"
    ]
    return fields + [
        Setting(p.name, "int" if p.integer else "float", p.help, p.default, {}, False) for p in parameters().values()
    ]
