"""Training objectives (lower bounds on log p(x)) and the gradient estimators that optimise them.

Every objective reads log-weights `[M*K, B]` (sample axis first, the M groups of K samples
laid out group-major) and returns one bound per image `[B]`, in log space throughout, so it
is exact in float32 even when every log-weight is around -5000.

A gradient estimator turns (objective, log-weights) into surrogate losses whose gradients are
the estimator: Pyro's convention. Importance weights that appear as coefficients are detached.

MIWAE here is Rainforth et al.'s multiply-importance-weighted bound (M IWAE_K estimates
averaged outside the log), not Mattei & Frellsen's missing-data IWAE of the same name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

OBJECTIVES = ("vae", "iwae", "miwae", "ciwae", "piwae")
ESTIMATORS = ("reparam", "stl", "dreg")


def _check_samples(log_w: torch.Tensor, expected: int) -> None:
    if log_w.shape[0] != expected:
        raise ValueError(f"log-weights have {log_w.shape[0]} samples on axis 0, the objective needs {expected}")


class Objective:
    """A bound on log p(x) from `num_samples` importance samples per image.

    `encoder` and `decoder` are the objectives whose gradients train q and p; they are this
    same object except for PIWAE, which trains them on different bounds."""

    num_samples: int

    @property
    def encoder(self) -> Objective:
        return self

    @property
    def decoder(self) -> Objective:
        return self

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dreg_coefficients(self, log_w: torch.Tensor) -> torch.Tensor:
        """c_i of the doubly-reparameterised encoder surrogate sum_i c_i log w_i `[M*K, B]`:
        the squared self-normalised weights of each IWAE term (Tucker et al. 2019)."""
        raise NotImplementedError


class MIWAE(Objective):
    """MIWAE(M, K) = 1/M sum_m log 1/K sum_k w_mk. IWAE_K is MIWAE(1, K); the k-sample
    Monte-Carlo ELBO (Burda's 'VAE' with k samples, no analytic KL) is MIWAE(k, 1)."""

    def __init__(self, m: int, k: int):
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


class IWAE(MIWAE):
    """IWAE_K = log 1/K sum_k w_k (Burda et al. 2016, eq. 8)."""

    def __init__(self, k: int):
        super().__init__(1, k)

    def __repr__(self) -> str:
        return f"IWAE(K={self.k})"


class ELBO(MIWAE):
    """The k-sample Monte-Carlo ELBO 1/k sum_k log w_k. With k samples it is what Burda et al.
    call 'VAE' in Table 1; for DReG each term is a K=1 IWAE, whose DReG form is STL."""

    def __init__(self, k: int):
        super().__init__(k, 1)

    def __repr__(self) -> str:
        return f"ELBO(K={self.m})"


class CIWAE(Objective):
    """CIWAE(beta) = beta ELBO + (1 - beta) IWAE_K on the same K samples (Rainforth et al. 2018)."""

    def __init__(self, beta: float, k: int):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"CIWAE beta={beta}: must lie in [0, 1] (0 is IWAE, 1 is the ELBO)")
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

    def __init__(self, m: int, k: int):
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


def build_objective(name: str, k: int, m: int = 1, beta: float = 0.5) -> Objective:
    """`vae` uses k samples (M*K of them if m > 1); `iwae` is IWAE_K per group, i.e. MIWAE
    when m > 1 is asked for explicitly under the name `miwae`."""
    if k < 1 or m < 1:
        raise ValueError(f"k={k}, m={m}: the numbers of samples must be at least 1")
    if name == "vae":
        return ELBO(m * k)
    if name == "iwae":
        if m != 1:
            raise ValueError(f"objective 'iwae' with m={m}: use objective 'miwae' for M > 1")
        return IWAE(k)
    if name == "miwae":
        return MIWAE(m, k)
    if name == "ciwae":
        if m != 1:
            raise ValueError(f"objective 'ciwae' with m={m}: CIWAE has a single group of K samples; set m=1")
        return CIWAE(beta, k)
    if name == "piwae":
        return PIWAE(m, k)
    raise ValueError(f"objective={name!r}: choose one of {', '.join(OBJECTIVES)}")


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


class GradientEstimator:
    """How gradients of an objective reach the encoder. The decoder always gets the exact
    gradient of its objective (theta enters only log p, never the sampling path)."""

    name: str
    stop_q_params: bool  # whether the log-weights must be the path-derivative form

    def surrogate(self, objective: Objective, log_w: torch.Tensor) -> Surrogate:
        raise NotImplementedError


class Reparameterised(GradientEstimator):
    """The standard estimator (Burda et al. eq. 14): autograd through the bound itself,
    which equals sum_i sg(w~_i) grad log w_i including the score term of q."""

    name, stop_q_params = "reparam", False

    def surrogate(self, objective: Objective, log_w: torch.Tensor) -> Surrogate:
        encoder_loss = -objective.encoder.bound(log_w).sum()
        if objective.decoder is objective.encoder:
            return Surrogate(encoder_loss, encoder_loss)
        return Surrogate(encoder_loss, -objective.decoder.bound(log_w).sum())


class STL(Reparameterised):
    """Sticking the landing (Roeder et al. 2017): the same surrogate on log-weights whose log q
    has its parameters detached, which drops the score-function term. Unbiased for K = 1,
    biased for K > 1 (Tucker et al. 2019). Valid for any number of stochastic layers: with
    (h1, h2) held fixed the dropped term is the score of the joint q, whose mean is zero."""

    name, stop_q_params = "stl", True


class DReG(GradientEstimator):
    """Doubly reparameterised gradients (Tucker et al. 2019) for the encoder:
    sum_i sg(w~_i^2) d log w_i / d h_i  d h_i / d phi, via path-derivative log-weights.

    Only for one stochastic layer: with a hierarchical q the doubly-reparameterised identity
    leaves extra score terms (Bauer & Mnih 2021), so `build_estimator` refuses L > 1."""

    name, stop_q_params = "dreg", True

    def surrogate(self, objective: Objective, log_w: torch.Tensor) -> Surrogate:
        coefficients = objective.dreg_coefficients(log_w).detach()
        return Surrogate(-(coefficients * log_w).sum(), -objective.decoder.bound(log_w).sum())


def build_estimator(name: str, layers: int) -> GradientEstimator:
    if name == "reparam":
        return Reparameterised()
    if name == "stl":
        return STL()
    if name == "dreg":
        if layers != 1:
            raise ValueError(
                f"estimator='dreg' with layers={layers}: DReG as published (Tucker et al. 2019) is only "
                f"unbiased for one stochastic layer; the hierarchical form needs Bauer & Mnih's (2021) "
                f"extra terms, which this project does not implement. Use layers=1, or estimator "
                f"'reparam' or 'stl' for {layers} layers."
            )
        return DReG()
    raise ValueError(f"estimator={name!r}: choose one of {', '.join(ESTIMATORS)}")
