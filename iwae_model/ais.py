"""Annealed importance sampling (AIS) and bidirectional Monte Carlo (BDMC): how far the k=5000
importance-sampling estimate of log p(x) is from the truth (docs/ais.md).

AIS (Neal 2001) anneals from a normalised start f_0 to the unnormalised posterior p(x, h)
through the geometric path f_t(h) = f_0(h)^(1 - beta_t) p(x, h)^beta_t, beta_0 = 0 < ... <
beta_T = 1 on Wu et al.'s sigmoid schedule (ICLR 2017, their code eval_gen). f_0 is the prior
p(h), so that f_t = p(h) p(x|h)^beta_t, or ("AIS + encoder", which Wu et al. found as accurate
with about 10x fewer distributions) q(h|x). h is every stochastic layer's latent, concatenated:
for 2 layers p(h) = p(h2) p(h1|h2) and q(h|x) = q(h1|x) q(h2|h1). A chain starts at h_0 ~ f_0;
for t = 1..T its log-weight gains log f_t(h_{t-1}) - log f_{t-1}(h_{t-1}) = (beta_t - beta_{t-1})
(log p(x, h) - log f_0(h)), and for t < T one Hamiltonian Monte Carlo transition that leaves f_t
invariant moves h_{t-1} to h_t (LEAPFROG_STEPS leapfrog steps, identity mass, a Metropolis
test). Then E[w] = p(x) for every chain, and the estimate, the log-mean-exp of the chains'
log-weights, is a stochastic lower bound like the IS estimate: E[log p^(x)] <= log p(x). With
steps = 1 no transition runs: AIS is then importance sampling from f_0 with k = chains.

Step sizes, and why the weights stay unbiased. Wu et al. adapt the step size during the run
towards an acceptance rate of 0.65 (eval_gen: one size for all chains and images, times 1.02 or
0.98 after each transition). A step size adapted from a chain's own acceptances makes the
kernel at distribution t a mixture of f_t-invariant kernels whose weights depend on where the
chain is (through the acceptances that brought it there); such a mixture is not f_t-invariant
in general, so Neal's argument, which needs each transition to leave its f_t invariant, fails
and the weights are no longer exactly unbiased. Here TUNING_CHAINS extra chains per image, with
noise of their own, adapt their own step sizes (log eps += ADAPTATION_RATE (a - 0.65) after each
transition, a the Metropolis acceptance probability) and their weights are discarded. The
estimation chains run beside them in the same tensors and use at distribution t the geometric
mean of the tuning chains' step sizes at t: a function of the tuning chains' past alone, and
the tuning chains never see the estimation chains. Given the tuning chains' whole run, each
estimation chain therefore meets a fixed sequence of f_t-invariant HMC kernels, Neal's argument
applies, and every estimation weight is exactly unbiased (the separate tuning round of
BorealisAI/rate_distortion's BDMC, here run in lock-step, for 25 % more rows at 16 chains).

BDMC (Grosse, Ghahramani & Adams 2015): for (h, x) simulated from the model, h ~ p(h) and
x ~ p(x|h), h is an exact posterior sample for x. AIS run backwards from h (beta from 1 to 0,
the forward estimation chains' step sizes in reverse order) has weights with E[w_rev] = 1/p(x),
so minus the log-mean-exp of their logs is a stochastic upper bound of log p(x), and forward AIS
gives a lower bound: their gap bounds the error of AIS with that schedule on such data.

Shapes: chains and images share the batch axes, `[chains, B, d]` with the sample axis first as
in the rest of the code; the only Python loops are over distributions, leapfrog steps and image
batches. Log-weights are float64 and reduced with logsumexp. d log f_t / dh comes from
torch.autograd.grad with respect to h alone: parameters gain no .grad.

Noise: every draw (starts, momenta, Metropolis uniforms, simulated images) comes from CPU
generators, one per stream and NOISE_BLOCK-image block, seeded from (seed, stream, block), as
the IS evaluation draws its noise (likelihood.evaluation_noise): an image's estimate does not
depend on which images share its batch, and is the same on any device up to float rounding.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from .likelihood import EVAL_SEED, NOISE_BLOCK, default_image_batch
from .models import IWAEModel, log_normal

STARTS = ("encoder", "prior")
LEAPFROG_STEPS = 10  # Wu et al.'s L
TARGET_ACCEPTANCE = 0.65
INITIAL_STEP_SIZE = 0.01  # eval_gen's epsilon
STEP_SIZE_RANGE = (1e-4, 0.5)  # eval_gen's clip
ADAPTATION_RATE = 0.5  # change of log eps per transition and unit of acceptance off target
TUNING_CHAINS = 4
SIGMOID_RADIUS = 4.0  # eval_gen's rad
STREAMS = {"tune": 0, "estimate": 1, "reverse": 2, "simulate": 3}


def sigmoid_schedule(steps: int, radius: float = SIGMOID_RADIUS) -> list[float]:
    """beta_0 = 0 < beta_1 < ... < beta_steps = 1: the logistic sigmoid of steps + 1 evenly spaced
    points of [-radius, radius], rescaled to [0, 1] (eval_gen's sigmoid_schedule(steps + 1)).
    Dense near 0 and 1, where the distributions change fastest."""
    s = torch.sigmoid(torch.linspace(-radius, radius, steps + 1, dtype=torch.float64))
    return ((s - s[0]) / (s[-1] - s[0])).tolist()


def stream_seed(seed: int, stream: str, block: int) -> int:
    return int(np.random.SeedSequence([seed, STREAMS[stream], block]).generate_state(1)[0])


class ChainNoise:
    """Draws `[chains, stop - start, ...]` for images start..stop-1 of a call, the chains in
    groups (stream, count): each stream and block of NOISE_BLOCK images has its own CPU
    generator seeded from (seed, stream, block); every draw is made for the whole block, cut to
    the images asked for and copied to `like`'s device and dtype."""

    def __init__(self, seed: int, groups: list[tuple[str, int]], start: int, stop: int, like: torch.Tensor):
        blocks = range(start // NOISE_BLOCK, (stop - 1) // NOISE_BLOCK + 1)
        self.groups = [
            (count, [torch.Generator().manual_seed(stream_seed(seed, stream, b)) for b in blocks])
            for stream, count in groups
        ]
        offset = start - blocks[0] * NOISE_BLOCK
        self.images = slice(offset, offset + stop - start)
        self.like = like

    def _draw(self, sample: Callable[..., torch.Tensor], trailing: tuple[int, ...]) -> torch.Tensor:
        draws = [
            torch.cat([sample((count, NOISE_BLOCK, *trailing), generator=g, dtype=self.like.dtype) for g in blocks], 1)
            for count, blocks in self.groups
        ]
        return torch.cat(draws)[:, self.images].to(self.like.device)

    def normal(self, *trailing: int) -> torch.Tensor:
        return self._draw(torch.randn, trailing)

    def uniform(self, *trailing: int) -> torch.Tensor:
        return self._draw(torch.rand, trailing)


def prior_latents(model: IWAEModel, noise: torch.Tensor) -> list[torch.Tensor]:
    """h ~ p(h) from standard-normal noise `[n, B, sum(d)]`: h_L = eps_L, then down the priors."""
    eps = noise.split(model.latent_dims, dim=-1)
    latents = [eps[-1]]
    for prior, e in zip(reversed(model.priors), reversed(eps[:-1])):
        mean, log_std = prior(latents[0])
        latents.insert(0, mean + torch.exp(log_std) * e)
    return latents


class Point(NamedTuple):
    """States h `[C, B, D]` (all layers' latents concatenated) with what every f_beta needs:
    log f_beta(h) = log_start + beta * log_ratio, log_ratio = log p(x, h) - log f_0(h), and
    both terms' gradients with respect to h."""

    h: torch.Tensor
    log_start: torch.Tensor
    log_ratio: torch.Tensor
    grad_start: torch.Tensor
    grad_ratio: torch.Tensor

    def log_f(self, beta: float) -> torch.Tensor:
        return self.log_start + beta * self.log_ratio

    def grad(self, beta: float) -> torch.Tensor:
        return self.grad_start + beta * self.grad_ratio


class Path:
    """The annealing path of binary images x `[B, D]` from f_0 = p(h) ("prior") or q(h|x)
    ("encoder") to p(x, h)."""

    def __init__(self, model: IWAEModel, x: torch.Tensor, start: str):
        self.model, self.x, self.start = model, x, start
        self.first_layer = model.encoders[0](x)  # q(h1|x)'s mean and log sigma, once per image

    def initial(self, noise: torch.Tensor) -> Point:
        """Exact draws of f_0 from standard-normal noise `[C, B, D]`."""
        if self.start == "prior":
            latents = prior_latents(self.model, noise)
        else:
            eps = noise.split(self.model.latent_dims, dim=-1)
            latents, _ = self.model.sample_q(self.x, noise=eps, first_layer=self.first_layer)
        return self.point(torch.cat(latents, dim=-1))

    def log_q(self, latents: list[torch.Tensor]) -> torch.Tensor:
        log_q = log_normal(latents[0], *self.first_layer)
        for encoder, below, above in zip(self.model.encoders[1:], latents[:-1], latents[1:]):
            log_q = log_q + log_normal(above, *encoder(below))
        return log_q

    def point(self, h: torch.Tensor) -> Point:
        with torch.enable_grad():
            h = h.detach().requires_grad_(True)
            latents = list(h.split(self.model.latent_dims, dim=-1))
            log_prior = self.model.log_prior(latents)
            log_lik = self.model.decoder.log_prob(self.x, latents[0])
            if self.start == "prior":
                log_start, log_ratio = log_prior, log_lik
            else:
                log_start = self.log_q(latents)
                log_ratio = log_prior + log_lik - log_start
            # With respect to h only: no parameter gradient is computed or accumulated.
            (grad_start,) = torch.autograd.grad(log_start.sum(), h, retain_graph=True)
            (grad_ratio,) = torch.autograd.grad(log_ratio.sum(), h)
        return Point(h.detach(), log_start.detach(), log_ratio.detach(), grad_start, grad_ratio)


def hmc(
    path: Path, point: Point, beta: float, step_size: torch.Tensor, noise: ChainNoise, leapfrog: int
) -> tuple[Point, torch.Tensor]:
    """One HMC transition leaving f_beta invariant for every chain: momentum ~ N(0, I),
    `leapfrog` leapfrog steps of size `step_size` `[C, B]`, a Metropolis test. Returns the new
    point and the acceptance probabilities min(1, exp(-dH)) `[C, B]`."""
    momentum = noise.normal(point.h.shape[-1])
    log_u = noise.uniform().log()
    eps = step_size[..., None]
    p = momentum + 0.5 * eps * point.grad(beta)
    proposal = point
    for step in range(leapfrog):
        proposal = path.point(proposal.h + eps * p)
        p = p + (eps if step < leapfrog - 1 else 0.5 * eps) * proposal.grad(beta)
    log_accept = (proposal.log_f(beta) - 0.5 * p.square().sum(-1)) - (
        point.log_f(beta) - 0.5 * momentum.square().sum(-1)
    )
    log_accept = torch.where(torch.isnan(log_accept), -math.inf, log_accept)  # a diverged trajectory is refused
    accept = log_u < log_accept
    moved = (
        torch.where(accept if old.dim() == 2 else accept[..., None], new, old) for new, old in zip(proposal, point)
    )
    return Point(*moved), log_accept.clamp(max=0).exp()


class Run(NamedTuple):
    """One annealing run's estimation chains."""

    log_weights: torch.Tensor  # [C, B] float64
    acceptance: torch.Tensor  # [B] mean acceptance probability over chains and transitions (NaN: no transition)
    step_sizes: torch.Tensor  # [T - 1, B] the step size of each transition


def anneal(
    path: Path,
    point: Point,
    betas: list[float],
    noise: ChainNoise,
    leapfrog: int,
    bar: tqdm,
    tuning: int = 0,
    step_sizes: torch.Tensor | None = None,
) -> Run:
    """AIS along `betas` (increasing: forward; decreasing: reverse) from `point`, exact draws of
    f_{betas[0]}, whose first `tuning` chains adapt their own step sizes; the other chains use
    `step_sizes` `[T - 1, B]` or, without, the geometric mean of the tuning chains' step sizes at
    each transition (module docstring: why that keeps their weights unbiased)."""
    chains, batch = point.log_ratio.shape
    log_w = torch.zeros((chains, batch), dtype=torch.float64, device=point.h.device)
    log_eps = point.log_ratio.new_full((tuning, batch), math.log(INITIAL_STEP_SIZE))
    low, high = (math.log(s) for s in STEP_SIZE_RANGE)
    used, accepted = [point.log_ratio.new_empty((0, batch))], []
    for t in range(1, len(betas) - 1):
        log_w += (betas[t] - betas[t - 1]) * point.log_ratio.double()
        frozen = log_eps.mean(0) if step_sizes is None else step_sizes[t - 1].log()
        point, accept = hmc(
            path, point, betas[t], torch.cat([log_eps, frozen.expand(chains - tuning, -1)]).exp(), noise, leapfrog
        )
        # The tuning chains' next step size depends on their own past: their weights are discarded.
        log_eps = (log_eps + ADAPTATION_RATE * (accept[:tuning] - TARGET_ACCEPTANCE)).clamp(low, high)
        used.append(frozen[None])
        accepted.append(accept[tuning:].mean(0))
        bar.update()
    log_w += (betas[-1] - betas[-2]) * point.log_ratio.double()  # no transition after the last distribution
    acceptance = torch.stack(accepted).mean(0) if accepted else point.log_ratio.new_full((batch,), math.nan)
    return Run(log_w[tuning:], acceptance.double(), torch.cat(used).exp())


def log_mean_exp(log_w: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(log_w, dim=0) - math.log(len(log_w))


@dataclass
class AISEstimate:
    """Per-image AIS results, `[B]` unless said."""

    log_likelihood: torch.Tensor  # float64: log-mean-exp over chains of the AIS log-weights
    log_weights: torch.Tensor  # [chains, B] float64; a wide spread: chains far from equilibrium
    acceptance: torch.Tensor  # mean HMC acceptance probability of the estimation chains (NaN for steps = 1)
    step_size: torch.Tensor  # geometric mean over transitions of their step sizes (NaN for steps = 1)


def as_estimate(run: Run) -> AISEstimate:
    return AISEstimate(
        log_mean_exp(run.log_weights), run.log_weights, run.acceptance, run.step_sizes.log().mean(0).exp().double()
    )


def concat(parts: list[AISEstimate]) -> AISEstimate:
    return AISEstimate(*(torch.cat([getattr(p, f.name) for p in parts], dim=-1) for f in fields(AISEstimate)))


@dataclass
class BDMCResult:
    """BDMC on `len(x)` images simulated from the model, per image `[N]`, float64."""

    x: torch.Tensor  # [N, D] the simulated binary images
    latents: list[torch.Tensor]  # [N, d_l] per layer: the h each image was drawn from, an exact posterior sample
    lower: torch.Tensor  # forward AIS: a stochastic lower bound of log p(x)
    upper: torch.Tensor  # reverse AIS from h: a stochastic upper bound of log p(x)
    forward: AISEstimate  # the forward run's details (its log_likelihood is `lower`)
    reverse_acceptance: torch.Tensor

    @property
    def gap(self) -> torch.Tensor:
        return self.upper - self.lower


def check_settings(steps: int, chains: int, start: str, leapfrog: int) -> None:
    for name, value in (("steps", steps), ("chains", chains), ("leapfrog", leapfrog)):
        if value < 1:
            raise ValueError(f"{name}={value}: must be at least 1")
    if start not in STARTS:
        raise ValueError(f"start={start!r}: must be one of {', '.join(STARTS)}")


def draw_seed(generator: torch.Generator | None) -> int:
    """EVAL_SEED by default, else a seed drawn from `generator`: every image's noise follows from it."""
    return EVAL_SEED if generator is None else int(torch.randint(2**62, (), generator=generator))


def progress_bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="transition", disable=not progress, file=sys.stderr)


def forward_run(
    path: Path, betas: list[float], chains: int, seed: int, start: int, stop: int, leapfrog: int, bar: tqdm
) -> Run:
    """The estimation chains of images start..stop-1 of the call, beside their tuning chains."""
    noise = ChainNoise(seed, [("tune", TUNING_CHAINS), ("estimate", chains)], start, stop, path.x)
    point = path.initial(noise.normal(sum(path.model.latent_dims)))
    return anneal(path, point, betas, noise, leapfrog, bar, tuning=TUNING_CHAINS)


@torch.no_grad()
def ais(
    model: IWAEModel,
    x: torch.Tensor,
    steps: int,
    chains: int = 16,
    start: str = "encoder",
    generator: torch.Generator | None = None,
    leapfrog: int = LEAPFROG_STEPS,
    image_batch: int | None = None,
    progress: bool = False,
) -> AISEstimate:
    """AIS estimates of log p(x) for binary images x `[N, D]`: `steps` annealing distributions
    after f_0 (beta_1..beta_steps = 1), `chains` chains per image (and TUNING_CHAINS more that
    set the step sizes), f_0 the encoder q(h|x) or the prior p(h). Deterministic for a
    generator's state (None: the evaluation seed); image i's estimate depends on (seed, i, x_i)
    only, whatever the `image_batch`."""
    check_settings(steps, chains, start, leapfrog)
    seed = draw_seed(generator)
    betas = sigmoid_schedule(steps)
    image_batch = image_batch or default_image_batch(x.device)
    parts = []
    with progress_bar(math.ceil(len(x) / image_batch) * (steps - 1), f"AIS, {steps} distributions", progress) as bar:
        for first in range(0, len(x), image_batch):
            xb = x[first : first + image_batch]
            run = forward_run(Path(model, xb, start), betas, chains, seed, first, first + len(xb), leapfrog, bar)
            parts.append(as_estimate(run))
    return concat(parts)


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """The mean over images and its standard error (NaN for one image)."""
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return float(values.mean()), se


@dataclass
class AISComparison:
    """AIS beside an importance-sampling (IS) estimate on the same images: both NLLs (nats, mean
    over images, with standard errors) and the paired difference AIS - IS of log p(x) per image
    (mean and SE over images; > 0: IS falls at least about this far below log p(x))."""

    steps: int
    chains: int
    start: str
    leapfrog: int
    images: int
    nll: float
    nll_se: float
    is_nll: float
    is_nll_se: float
    ais_minus_is: float
    ais_minus_is_se: float
    acceptance: float  # mean HMC acceptance of the estimation chains (NaN for steps = 1)
    log_weight_sd_median: float  # median over images of the chains' log-weight SD
    seconds: float
    log_likelihood: np.ndarray = field(repr=False)  # [images] float64: the per-image AIS estimates

    def summary(self) -> dict:
        """Every figure but the per-image estimates, JSON-ready."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "log_likelihood"}


def ais_beside_is(
    model: IWAEModel,
    x: torch.Tensor,
    is_log_likelihood: np.ndarray,
    steps: int,
    chains: int = 16,
    start: str = "encoder",
    progress: bool = False,
) -> AISComparison:
    """AIS (`ais`, the evaluation seed) on binary images x `[N, D]` beside the IS estimates
    `is_log_likelihood` `[N]` of the same images."""
    began = time.perf_counter()
    result = ais(model, x, steps, chains, start, progress=progress)
    ais_ll = result.log_likelihood.cpu().numpy()
    nll, nll_se = mean_se(-ais_ll)
    is_nll, is_nll_se = mean_se(-is_log_likelihood)
    difference, difference_se = mean_se(ais_ll - is_log_likelihood)
    return AISComparison(
        steps=steps,
        chains=chains,
        start=start,
        leapfrog=LEAPFROG_STEPS,
        images=len(x),
        nll=nll,
        nll_se=nll_se,
        is_nll=is_nll,
        is_nll_se=is_nll_se,
        ais_minus_is=difference,
        ais_minus_is_se=difference_se,
        acceptance=float(result.acceptance.mean()),
        log_weight_sd_median=float(result.log_weights.std(0).median()),
        seconds=time.perf_counter() - began,
        log_likelihood=ais_ll,
    )


def ais_log_likelihood(
    model: IWAEModel,
    x: torch.Tensor,
    steps: int,
    chains: int = 16,
    start: str = "encoder",
    generator: torch.Generator | None = None,
    **options,
) -> torch.Tensor:
    """The AIS estimate of log p(x) per image, float64 `[N]`; `options`: ais's leapfrog,
    image_batch and progress."""
    return ais(model, x, steps, chains, start, generator, **options).log_likelihood


@torch.no_grad()
def bdmc(
    model: IWAEModel,
    images: int,
    steps: int,
    chains: int = 16,
    start: str = "encoder",
    generator: torch.Generator | None = None,
    leapfrog: int = LEAPFROG_STEPS,
    image_batch: int | None = None,
    progress: bool = False,
) -> BDMCResult:
    """BDMC on `images` new images simulated from the model (h ~ p(h), then binary x ~ p(x|h)):
    per image forward AIS, exactly as `ais` runs it (same steps, chains, start), for a lower
    bound of log p(x), and reverse AIS from h along the same distributions with the forward
    chains' step sizes in reverse order, all `chains` chains starting at h, for an upper bound."""
    check_settings(steps, chains, start, leapfrog)
    if images < 1:
        raise ValueError(f"images={images}: must be at least 1")
    seed = draw_seed(generator)
    betas = sigmoid_schedule(steps)
    weight = model.decoder.out.weight
    image_batch = image_batch or default_image_batch(weight.device)
    dim = sum(model.latent_dims)
    xs, hs, forwards, uppers, reverse_acceptance = [], [], [], [], []
    batches = math.ceil(images / image_batch)
    with progress_bar(batches * 2 * (steps - 1), f"BDMC, {steps} distributions", progress) as bar:
        for first in range(0, images, image_batch):
            last = min(first + image_batch, images)
            simulate = ChainNoise(seed, [("simulate", 1)], first, last, weight)
            latents = prior_latents(model, simulate.normal(dim))
            x = (simulate.uniform(model.x_dim) < torch.sigmoid(model.decoder.logits(latents[0])))[0].to(weight.dtype)
            path = Path(model, x, start)
            forward = forward_run(path, betas, chains, seed, first, last, leapfrog, bar)
            noise = ChainNoise(seed, [("reverse", chains)], first, last, weight)
            h = torch.cat(latents, dim=-1).expand(chains, -1, -1)
            reverse = anneal(
                path, path.point(h), betas[::-1], noise, leapfrog, bar, step_sizes=forward.step_sizes.flip(0)
            )
            xs.append(x)
            hs.append([h[0] for h in latents])
            forwards.append(as_estimate(forward))
            uppers.append(-log_mean_exp(reverse.log_weights))
            reverse_acceptance.append(reverse.acceptance)
    forward = concat(forwards)
    return BDMCResult(
        torch.cat(xs),
        [torch.cat(layer) for layer in zip(*hs)],
        forward.log_likelihood,
        torch.cat(uppers),
        forward,
        torch.cat(reverse_acceptance),
    )
