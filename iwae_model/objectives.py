"""Training objectives (lower bounds on log p(x)) and the gradient estimators that optimise them.

Every objective reads log-weights `[M*K, B]` (sample axis first, the M groups of K samples
laid out group-major) and returns one bound per image `[B]`, in log space throughout, so it
is exact in float32 even when every log-weight is around -5000.

Each objective is one class (Pyro's ELBO classes are the model): its bound, and for each
gradient estimator it supports the surrogate losses whose gradients are that estimator.
Importance weights that appear as coefficients are detached. A class with a `name` registers
itself in OBJECTIVES, which everything else reads (docs/plugins.md: your own bound).

MIWAE here is Rainforth et al.'s multiply-importance-weighted bound (M IWAE_K estimates
averaged outside the log), not Mattei & Frellsen's missing-data IWAE of the same name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import IWAEError


class ObjectiveDefinitionError(IWAEError, TypeError):
    """An objective class that cannot be registered: the message names the class and the fix."""


@dataclass(frozen=True)
class Parameter:
    """A number an objective takes besides K and M (CIWAE's beta), declared once: the training
    setting, the train CLI's flag, the space file's key, the label and the Parquet column all
    come from it. The range is closed: [low, high]."""

    name: str
    default: float
    low: float
    high: float
    help: str
    label: str  # its prefix in a trial's label: beta=0.5 is `_b0.5`
    integer: bool = False
    symbol: str = ""  # how the query's tables write it (β); its name if empty

    def __post_init__(self) -> None:
        def fail(message: str) -> ObjectiveDefinitionError:
            return ObjectiveDefinitionError(f"Parameter {self.name!r}: {message}")

        if not isinstance(self.name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise fail("the name must be lower-case letters, digits and '_', starting with a letter")
        if not isinstance(self.label, str) or not re.fullmatch(r"[a-z]+", self.label):
            raise fail(f"label={self.label!r}: give a short lower-case prefix for trial labels, e.g. 'b'")
        for key in ("default", "low", "high"):
            value = getattr(self, key)
            if not _is_number(value) or not math.isfinite(value):
                raise fail(f"{key}={value!r}: every parameter needs a finite default and range [low, high]")
        if self.integer and not all(isinstance(getattr(self, key), int) for key in ("default", "low", "high")):
            raise fail("an integer parameter needs an integer default, low and high")
        if not self.low <= self.default <= self.high:
            raise fail(f"default {self.default} outside its range [{self.low}, {self.high}]")
        if not isinstance(self.help, str) or not self.help:
            raise fail("give a help text: it is the --flag's help and the Parquet column's description")

    def check(self, value: Any) -> None:
        """Raise ValueError naming the parameter when `value` is not a number in its range."""
        kind = "an integer" if self.integer else "a number"
        if not _is_number(value) or (self.integer and not isinstance(value, int)) or not self.low <= value <= self.high:
            raise ValueError(f"{self.name}={value!r}: must be {kind} in [{self.low:g}, {self.high:g}] ({self.help})")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class Surrogate:
    """Losses to minimise whose gradients are the estimator: `encoder_loss` for phi,
    `decoder_loss` for theta (the same tensor when one backward pass serves both)."""

    encoder_loss: torch.Tensor
    decoder_loss: torch.Tensor

    def backward(self, encoder_params: list[nn.Parameter], decoder_params: list[nn.Parameter]) -> None:
        if self.encoder_loss is self.decoder_loss:
            self.encoder_loss.backward()
            return
        self.decoder_loss.backward(inputs=decoder_params, retain_graph=True)
        self.encoder_loss.backward(inputs=encoder_params)


def _check_samples(log_w: torch.Tensor, expected: int) -> None:
    if log_w.shape[0] != expected:
        raise ValueError(f"log-weights have {log_w.shape[0]} samples on axis 0, the objective needs {expected}")


@dataclass(frozen=True)
class GradientEstimator:
    """How gradients reach the encoder, and the form of log-weights that needs (`sampling`,
    the keyword arguments of IWAEModel.log_weights). The objective makes the surrogate losses
    (Objective.surrogate); the decoder always gets the exact gradient of its objective."""

    name: str
    sampling: tuple[tuple[str, bool], ...]
    help: str

    @property
    def sampling_options(self) -> dict[str, bool]:
        return dict(self.sampling)


ESTIMATORS = {
    estimator.name: estimator
    for estimator in (
        GradientEstimator("reparam", (), "the standard reparameterised gradient (Burda et al. eq. 14)"),
        GradientEstimator("stl", (("stop_q_params", True),), "sticking the landing (Roeder et al. 2017)"),
        GradientEstimator(
            "dreg", (("stop_q_params", True),), "doubly reparameterised (Tucker et al. 2019; 1 layer only)"
        ),
        GradientEstimator("wake", (("detach_samples", True),), "reweighted wake-sleep's wake-phi update (RWS only)"),
    )
}


def build_estimator(name: str, layers: int) -> GradientEstimator:
    if name not in ESTIMATORS:
        raise ValueError(f"estimator={name!r}: choose one of {', '.join(ESTIMATORS)}")
    if name == "dreg" and layers != 1:
        raise ValueError(
            f"estimator='dreg' with layers={layers}: DReG as published (Tucker et al. 2019) is only "
            f"unbiased for one stochastic layer; the hierarchical form needs Bauer & Mnih's (2021) "
            f"extra terms, which this project does not implement. Use layers=1, or estimator "
            f"'reparam' or 'stl' for {layers} layers."
        )
    return ESTIMATORS[name]


OBJECTIVES: dict[str, type[Objective]] = {}  # by name, in the order they were defined
# Names a parameter may not take: TrainConfig's fields (config.py adds them when it is imported,
# before any objective but the built-ins registers).
RESERVED_NAMES: set[str] = set()


class Objective:
    """A bound on log p(x) from `num_samples` importance samples per image, and the surrogate
    losses of each gradient estimator it supports.

    A subclass with a `name` registers itself: TrainConfig, the train CLI, space files, labels,
    HParams, Parquet and the query's tables all read it from OBJECTIVES. It declares:
      name         the `objective` setting's value
      parameters   its own settings besides k and m (Parameter), with ranges
      grouped      whether it takes M > 1 groups of K samples
      estimators   the gradient estimators it supports, `default_estimator` the one used unless
                   the configuration names another
    and implements `bound`, plus `dreg_coefficients` if it supports dreg and `surrogate` if it
    supports an estimator the base class does not implement (wake).

    `encoder` and `decoder` are the objectives whose gradients train q and p; they are this
    same object except where an objective trains them on different bounds (PIWAE)."""

    name: ClassVar[str]
    parameters: ClassVar[tuple[Parameter, ...]] = ()
    grouped: ClassVar[bool] = False
    estimators: ClassVar[tuple[str, ...]] = ("reparam", "stl")
    default_estimator: ClassVar[str] = "reparam"
    num_samples: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            _register(cls)

    @classmethod
    def build(cls, k: int, m: int, **parameters: float) -> Objective:
        """The objective for K samples per group and M groups, its parameters already checked."""
        if not cls.grouped and m != 1:
            raise ValueError(f"objective {cls.name!r} with m={m}: it has a single group of K samples; set m=1")
        return cls(m=m, k=k, **parameters) if cls.grouped else cls(k=k, **parameters)

    @property
    def encoder(self) -> Objective:
        return self

    @property
    def decoder(self) -> Objective:
        return self

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        """The bound per image `[B]` from log-weights `[num_samples, B]`."""
        raise NotImplementedError

    def dreg_coefficients(self, log_w: torch.Tensor) -> torch.Tensor:
        """c_i of the doubly-reparameterised encoder surrogate sum_i c_i log w_i `[M*K, B]`:
        the squared self-normalised weights of each IWAE term (Tucker et al. 2019)."""
        raise NotImplementedError

    def surrogate(self, log_w: torch.Tensor, estimator: str) -> Surrogate:
        """Losses whose gradients are `estimator`'s, from log-weights in its sampling form.

        reparam: autograd through the bound itself, which equals sum_i sg(w~_i) grad log w_i
        including the score term of q. stl (Roeder et al. 2017): the same surrogate on
        path-derivative log-weights, which drops the score term; unbiased for K = 1, biased for
        K > 1 (Tucker et al. 2019), valid for any number of stochastic layers (with (h1, h2) held
        fixed the dropped term is the score of the joint q, whose mean is zero). dreg (Tucker et
        al. 2019): sum_i sg(c_i) log w_i on path-derivative log-weights."""
        decoder_loss = -self.decoder.bound(log_w).sum()
        if estimator == "dreg":
            return Surrogate(-(self.dreg_coefficients(log_w).detach() * log_w).sum(), decoder_loss)
        if estimator in ("reparam", "stl"):
            if self.decoder is self.encoder:
                return Surrogate(decoder_loss, decoder_loss)
            return Surrogate(-self.encoder.bound(log_w).sum(), decoder_loss)
        raise ValueError(f"objective {self.name!r} has no surrogate for estimator {estimator!r}")

    def __repr__(self) -> str:
        own = [f"{p.name}={getattr(self, p.name, '?')}" for p in self.parameters]
        return f"{self.name.upper()}({', '.join([*own, f'K={self.num_samples}'])})"


def _register(cls: type[Objective]) -> None:
    """Check an objective class's declaration and add it to OBJECTIVES."""

    def fail(message: str) -> ObjectiveDefinitionError:
        return ObjectiveDefinitionError(f"objective class {cls.__qualname__} (name {cls.name!r}): {message}")

    if not isinstance(cls.name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", cls.name):
        raise fail("the name must be lower-case letters, digits and '_', starting with a letter")
    if cls.name in OBJECTIVES:
        raise fail(f"the name is taken by {OBJECTIVES[cls.name].__module__}.{OBJECTIVES[cls.name].__qualname__}")
    if cls.bound is Objective.bound:
        raise fail("it has no bound(log_w): define it, log-weights [num_samples, B] -> one bound per image [B]")
    if not cls.estimators or not set(cls.estimators) <= set(ESTIMATORS):
        raise fail(f"estimators={cls.estimators!r}: name some of {', '.join(ESTIMATORS)}")
    if cls.default_estimator not in cls.estimators:
        raise fail(f"default_estimator={cls.default_estimator!r} is not one of its estimators {cls.estimators}")
    if "dreg" in cls.estimators and cls.dreg_coefficients is Objective.dreg_coefficients:
        raise fail("it lists dreg among its estimators but has no dreg_coefficients(log_w)")
    if "wake" in cls.estimators and cls.surrogate is Objective.surrogate:
        raise fail("it lists wake among its estimators but has no surrogate(log_w, estimator) for it")
    if not isinstance(cls.parameters, tuple) or not all(isinstance(p, Parameter) for p in cls.parameters):
        raise fail("parameters must be a tuple of iwae_model.objectives.Parameter")
    names = [p.name for p in cls.parameters]
    if len(set(names)) != len(names):
        raise fail(f"parameters {names} name one twice")
    if taken := sorted(set(names) & RESERVED_NAMES):
        raise fail(f"its parameter(s) {taken} are training settings' names; rename them")
    for parameter in cls.parameters:
        for other in OBJECTIVES.values():
            if any(p.name == parameter.name and p != parameter for p in other.parameters):
                raise fail(f"parameter {parameter.name!r} is already {other.name}'s, declared differently; rename it")
    OBJECTIVES[cls.name] = cls


def parameters() -> dict[str, Parameter]:
    """Every registered objective's parameters by name (objectives may share one declaration)."""
    return {p.name: p for cls in OBJECTIVES.values() for p in cls.parameters}


class _Groups(Objective):
    """MIWAE(M, K) = 1/M sum_m log 1/K sum_k w_mk, the maths of the vae, iwae and miwae names:
    IWAE_K is MIWAE(1, K); the k-sample Monte-Carlo ELBO (Burda's 'VAE' with k samples, no
    analytic KL) is MIWAE(k, 1)."""

    estimators = ("reparam", "stl", "dreg")

    def __init__(self, m: int, k: int) -> None:
        if m < 1 or k < 1:
            raise ValueError(f"MIWAE needs M >= 1 and K >= 1, got M={m}, K={k}")
        self.m, self.k = m, k
        self.num_samples = m * k

    def _groups(self, log_w: torch.Tensor) -> torch.Tensor:
        _check_samples(log_w, self.num_samples)
        return log_w.reshape(self.m, self.k, *log_w.shape[1:])

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        groups = self._groups(log_w)
        return (torch.logsumexp(groups, dim=1) - math.log(self.k)).mean(0)

    def dreg_coefficients(self, log_w: torch.Tensor) -> torch.Tensor:
        normalised = torch.softmax(self._groups(log_w.detach()), dim=1)
        return (normalised.square() / self.m).reshape(log_w.shape)

    def __repr__(self) -> str:
        return f"MIWAE(M={self.m}, K={self.k})"


class ELBO(_Groups):
    """The k-sample Monte-Carlo ELBO 1/k sum_k log w_k. With k samples it is what Burda et al.
    call 'VAE' in Table 1; for DReG each term is a K=1 IWAE, whose DReG form is STL. As the
    objective `vae` with M > 1 it uses M*K samples."""

    name = "vae"
    grouped = True

    def __init__(self, k: int) -> None:
        super().__init__(k, 1)

    @classmethod
    def build(cls, k: int, m: int) -> Objective:
        return cls(m * k)

    def __repr__(self) -> str:
        return f"ELBO(K={self.m})"


class IWAE(_Groups):
    """IWAE_K = log 1/K sum_k w_k (Burda et al. 2016, eq. 8)."""

    name = "iwae"

    def __init__(self, k: int) -> None:
        super().__init__(1, k)

    @classmethod
    def build(cls, k: int, m: int) -> Objective:
        if m != 1:
            raise ValueError(f"objective 'iwae' with m={m}: use objective 'miwae' for M > 1")
        return cls(k)

    def __repr__(self) -> str:
        return f"IWAE(K={self.k})"


class MIWAE(_Groups):
    """Rainforth et al.'s multiply-importance-weighted bound, M IWAE_K estimates averaged
    outside the log."""

    name = "miwae"
    grouped = True


class CIWAE(Objective):
    """CIWAE(beta) = beta ELBO + (1 - beta) IWAE_K on the same K samples (Rainforth et al. 2018)."""

    name = "ciwae"
    parameters = (
        Parameter("beta", 0.5, 0.0, 1.0, "CIWAE's mixing weight of the ELBO (0 is IWAE, 1 the ELBO)", "b", symbol="β"),
    )

    estimators = ("reparam", "stl", "dreg")

    def __init__(self, beta: float, k: int) -> None:
        self.beta, self.k = beta, k
        self.elbo, self.iwae = ELBO(k), IWAE(k)
        self.num_samples = k

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        return self.beta * self.elbo.bound(log_w) + (1 - self.beta) * self.iwae.bound(log_w)

    def dreg_coefficients(self, log_w: torch.Tensor) -> torch.Tensor:
        return self.beta * self.elbo.dreg_coefficients(log_w) + (1 - self.beta) * self.iwae.dreg_coefficients(log_w)

    def __repr__(self) -> str:
        return f"CIWAE(beta={self.beta}, K={self.k})"


class PIWAE(Objective):
    """PIWAE(M, K): q trained on MIWAE(M, K), p on IWAE_{M*K}, from the same M*K samples.
    Its reported bound is the generative network's target, IWAE_{M*K}."""

    name = "piwae"
    grouped = True

    estimators = ("reparam", "stl", "dreg")

    def __init__(self, m: int, k: int) -> None:
        self._encoder, self._decoder = MIWAE(m, k), IWAE(m * k)
        self.m, self.k = m, k
        self.num_samples = m * k

    @property
    def encoder(self) -> Objective:
        return self._encoder

    @property
    def decoder(self) -> Objective:
        return self._decoder

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        return self._decoder.bound(log_w)

    def dreg_coefficients(self, log_w: torch.Tensor) -> torch.Tensor:
        return self._encoder.dreg_coefficients(log_w)

    def __repr__(self) -> str:
        return f"PIWAE(M={self.m}, K={self.k})"


def build_objective(name: str, k: int, m: int = 1, **parameters: float) -> Objective:
    """The registered objective `name` with K samples per group and M groups; `parameters` are
    its own (absent ones take their defaults), checked against their declared ranges."""
    if k < 1 or m < 1:
        raise ValueError(f"k={k}, m={m}: the numbers of samples must be at least 1")
    if name not in OBJECTIVES:
        raise ValueError(f"objective={name!r}: choose one of {', '.join(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    if unknown := sorted(set(parameters) - {p.name for p in cls.parameters}):
        raise ValueError(
            f"objective {name!r} takes no parameter(s) {unknown}; its own: {[p.name for p in cls.parameters]}"
        )
    values = {}
    for parameter in cls.parameters:
        values[parameter.name] = parameters.get(parameter.name, parameter.default)
        parameter.check(values[parameter.name])
    return cls.build(k, m, **values)


class VR(Objective):
    """The Renyi (VR) bound, Li & Turner (2016): 1/(1 - alpha) log 1/K sum_k w_k^(1 - alpha).
    alpha = 0 is IWAE_K, alpha -> 1 the K-sample ELBO (alpha = 1 is taken as that limit).
    Its reparameterised gradient weighs each log w_k by w_k^(1-alpha) / sum_j w_j^(1-alpha).
    STL applies as it does to IWAE (biased for K > 1). Not DReG: Tucker et al.'s identity is
    derived for IWAE's squared weights, and VR's form (Bauer & Mnih 2021) is not implemented."""

    name = "vr"
    parameters = (
        Parameter("alpha", 0.5, 0.0, 1.0, "the VR bound's Renyi order (0 is IWAE, 1 the ELBO)", "a", symbol="α"),
    )
    estimators = ("reparam", "stl")

    def __init__(self, alpha: float, k: int) -> None:
        self.alpha, self.k = alpha, k
        self.num_samples = k

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        _check_samples(log_w, self.k)
        if self.alpha == 1:
            return log_w.mean(0)
        scale = 1 - self.alpha
        if scale >= 0.1:
            return (torch.logsumexp(scale * log_w, dim=0) - math.log(self.k)) / scale
        # Near alpha = 1, logsumexp - log K cancels to O(scale) and the division magnifies its
        # float32 rounding (0.05 nats at alpha = 0.99999); log1p(mean(expm1(.))) keeps it exact.
        top = log_w.max(dim=0).values
        return top + torch.log1p(torch.expm1(scale * (log_w - top)).mean(0)) / scale

    def __repr__(self) -> str:
        return f"VR(alpha={self.alpha}, K={self.k})"


class RWS(Objective):
    """Reweighted wake-sleep (Bornschein & Bengio 2015; Le et al. 2019): the decoder trained on
    IWAE_K, the encoder by the wake-phi update sum_k w~_k grad_phi log q(h_k | x) with the samples
    h_k held fixed, which minimises an estimate of KL(p(h|x) || q(h|x)) rather than raising a
    bound. Its reported bound is IWAE_K."""

    name = "rws"
    estimators = ("wake",)
    default_estimator = "wake"

    def __init__(self, k: int) -> None:
        self.k, self.iwae = k, IWAE(k)
        self.num_samples = k

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        return self.iwae.bound(log_w)

    def surrogate(self, log_w: torch.Tensor, estimator: str) -> Surrogate:
        # With h fixed, log w = log p(x, h) - log q_phi(h | x): descending sum_k sg(w~_k) log w_k
        # ascends sum_k w~_k log q_phi(h_k | x).
        if estimator != "wake":
            raise ValueError(f"objective 'rws' has no surrogate for estimator {estimator!r}; it trains by 'wake'")
        weights = torch.softmax(log_w.detach(), dim=0)
        return Surrogate((weights * log_w).sum(), -self.bound(log_w).sum())

    def __repr__(self) -> str:
        return f"RWS(K={self.k})"
