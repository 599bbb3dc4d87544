"""A sweep's plan before anything runs (`python -m sweep.run --dry-run`): every trial, the
evaluation work, and the wall time estimated from a few seconds of real training steps and
evaluation on this machine, spread over the trials that can run at once.

The estimate counts training steps, the per-pass validation and test bounds (and NLL estimates
when `nll_every` or `valid_ll_k` asks for them) and the final k-sample evaluation (and AIS, with
`evaluation.ais`); a `continue` stage starts
when the first has finished. It leaves out Ray's start-up (seconds), checkpoint uploads and
gradient-SNR measurements (about 2 % of a trial at the shipped settings), so short sweeps take
longer than it says.
"""

from __future__ import annotations

import heapq
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import ray
import torch

from iwae_model import TrainConfig
from iwae_model.config import settings
from iwae_model.datasets import DATASETS
from iwae_model.timing import (
    ais_seconds_per_image,
    bound_seconds_per_image,
    likelihood_seconds_per_image,
    training_step_seconds,
)

from .cluster import ClusterError, init_ray
from .space import Distribution, SweepSpace
from .trials import trial_name

CALIBRATION_STEPS = 15
CALIBRATION_IMAGES = 4
AIS_CALIBRATION_STEPS = 10  # AIS's time grows in proportion to its steps


def calibrated_as() -> dict[str, Any]:
    """The settings that cannot change the work of one step or one evaluated image
    (config.setting's step_cost), at their defaults: a configuration is calibrated so, once for
    all the trials that differ only in them."""
    return {s.name: s.default for s in settings() if not s.step_cost}


def cost_fields() -> list[str]:
    return [s.name for s in settings() if s.step_cost]


@dataclass(frozen=True)
class TrialPlan:
    label: str
    samples: int  # M*K per image
    layers: int
    passes: int
    steps: int
    train_seconds: float  # optimizer steps only
    seconds: float  # with the per-pass bounds and NLL estimates


@dataclass(frozen=True)
class SweepPlan:
    trials: list[TrialPlan]
    concurrent: int
    checkpoints: int
    eval_images: int  # over all checkpoints
    eval_k: int
    ais_images: int  # over all checkpoints (0: AIS off)
    eval_seconds: float  # all checkpoints, IS and AIS, `eval_actors` at a time
    train_wall_seconds: float
    device: str
    threads: int

    @property
    def wall_seconds(self) -> float:
        return self.train_wall_seconds + self.eval_seconds


def steps_per_pass(config: TrainConfig) -> int:
    return (config.train_images or DATASETS[config.dataset].splits[0]) // config.batch_size


def drawn_trials(space: SweepSpace) -> list[TrainConfig]:
    """The trials the plan assumes: a grid's, or a search's `samples` draws per grid point
    (with numpy and the search's seed: the searcher draws its own)."""
    if space.search is None:
        return space.trials
    rng = np.random.default_rng(space.search.seed)
    return [
        trial.with_changes(**{key: draw(d, rng) for key, d in space.search.distributions.items()})
        for _ in range(space.search.samples)
        for trial in space.trials
    ]


def draw(distribution: Distribution, rng: np.random.Generator) -> Any:
    values = distribution.values
    if distribution.kind == "choice":
        return values[rng.integers(len(values))]
    low, high = values
    if distribution.kind == "uniform":
        return float(rng.uniform(low, high))
    if distribution.kind == "loguniform":
        return float(np.exp(rng.uniform(np.log(low), np.log(high))))
    if distribution.kind == "randint":
        return int(rng.integers(low, high))
    return int(min(high - 1, np.floor(np.exp(rng.uniform(np.log(low), np.log(high))))))  # lograndint


def makespan(durations: list[float], slots: int) -> float:
    """Wall time when trials start in order, each on the first slot to come free (as Tune
    launches a grid)."""
    ends = [0.0] * max(1, slots)
    for duration in durations:
        heapq.heappush(ends, heapq.heappop(ends) + duration)
    return max(ends)


def plan_sweep(space: SweepSpace, device: torch.device, concurrent: int, eval_threads: int) -> SweepPlan:
    """Calibrate every distinct model/objective once on `device` (a trial's thread count:
    `resources.cpus_per_trial`) and estimate each trial and the evaluation."""
    threads = torch.get_num_threads()
    trial_threads = max(1, int(space.resources.cpus_per_trial))
    calibrated: dict[tuple, TrainConfig] = {}  # by cost_fields(): a 20,000-trial grid has a handful
    cost_names, calibration = cost_fields(), calibrated_as()
    seconds: dict[tuple, float] = {}

    def timed(what: tuple, measure: Callable[[], float]) -> float:
        if what not in seconds:
            seconds[what] = measure()
        return seconds[what]

    plans = []
    try:
        torch.set_num_threads(trial_threads)
        trials = drawn_trials(space)
        searched = list(space.search.distributions) if space.search else []
        trained = [] if space.init_from_sweep else trials  # --init-from-sweep: stage 1 exists
        for config in [*trained, *space.continued]:
            cost = tuple(getattr(config, name) for name in cost_names)
            if cost not in calibrated:
                calibrated[cost] = replace(config, **calibration)
            key = calibrated[cost]
            step = timed(("step", key), partial(training_step_seconds, key, device, CALIBRATION_STEPS, warmup=3))
            per_image = timed(("bound", key), partial(bound_seconds_per_image, key, device))
            steps = steps_per_pass(config) * config.passes
            _, valid_images, all_test = DATASETS[config.dataset].splits
            test_images = config.test_images or all_test
            test_passes = math.ceil(config.passes / config.eval_every)
            bounds = (config.passes * valid_images + test_passes * test_images) * per_image
            nll = 0.0
            if config.nll_every:
                nll = (
                    config.passes
                    // config.nll_every
                    * min(config.nll_images, test_images)
                    * timed(
                        ("likelihood", key, config.nll_k),
                        partial(likelihood_seconds_per_image, key, device, config.nll_k, CALIBRATION_IMAGES),
                    )
                )
            if config.valid_ll_k:  # the fair metric, every pass
                nll += (
                    config.passes
                    * valid_images
                    * timed(
                        ("likelihood", key, config.valid_ll_k),
                        partial(likelihood_seconds_per_image, key, device, config.valid_ll_k, CALIBRATION_IMAGES),
                    )
                )
            plans.append(
                TrialPlan(
                    trial_name(config, searched, None),
                    config.build_objective().num_samples,
                    config.layers,
                    config.passes,
                    steps,
                    steps * step,
                    steps * step + bounds + nll,
                )
            )
        torch.set_num_threads(max(1, eval_threads))
        evaluation = space.evaluation
        trials = [*trials, *space.continued]
        chosen = trials if evaluation.best == "each" else trials[: evaluation.top]
        images = [evaluation.images or DATASETS[t.dataset].splits[2] for t in chosen]
        layers = {t.layers for t in chosen}
        per_image = {
            n: likelihood_seconds_per_image(TrainConfig(layers=n), device, evaluation.k, CALIBRATION_IMAGES)
            for n in layers
        }
        ais = evaluation.ais
        ais_images = [ais.images_of(n) if ais else 0 for n in images]
        ais_per_image = {
            n: ais.steps
            / AIS_CALIBRATION_STEPS
            * ais_seconds_per_image(
                TrainConfig(layers=n), device, AIS_CALIBRATION_STEPS, ais.chains, CALIBRATION_IMAGES, ais.start
            )
            for n in (layers if ais else ())
        }
        eval_seconds = makespan(
            [
                n * per_image[t.layers] + m * ais_per_image.get(t.layers, 0)
                for n, m, t in zip(images, ais_images, chosen)
            ],
            space.resources.eval_actors,
        )
    finally:
        torch.set_num_threads(threads)
    first = len(trained)
    train_wall = makespan([p.seconds for p in plans[:first]], concurrent) + makespan(
        [p.seconds for p in plans[first:]], concurrent
    )
    return SweepPlan(
        plans,
        concurrent,
        len(chosen),
        sum(images),
        evaluation.k,
        sum(ais_images),
        eval_seconds,
        train_wall,
        str(device),
        trial_threads,
    )


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def plan_text(space: SweepSpace, plan: SweepPlan, where: str, asha: bool = False) -> str:
    width = max(len(t.label) for t in plan.trials)
    lines = [
        f"Sweep {space.name!r} from {space.source}: {len(plan.trials)} trial(s). Nothing is trained "
        f"and no folder is written."
    ]
    if space.search:
        search = space.search
        lines.append(
            f"A search ({search.algorithm}): {search.samples} sample(s) x {len(space.trials)} grid point(s) of "
            f"{', '.join(f'{key} ~ {d}' for key, d in search.distributions.items())}, ranked by "
            f"{space.metric}. The values below are drawn here for the estimate; the searcher draws its own."
        )
    lines += ["", f"  {'trial':<{width}}  {'M*K':>5}  {'layers':>6}  {'passes':>6}  {'steps':>11}  {'estimate':>9}"]
    lines += [
        f"  {t.label:<{width}}  {t.samples:>5}  {t.layers:>6}  {t.passes:>6}  {t.steps:>11,}  {duration(t.seconds):>9}"
        for t in plan.trials
    ]
    total_steps = sum(t.steps for t in plan.trials)
    lines += [
        "",
        f"Training: {total_steps:,} optimizer steps in all, {duration(sum(t.seconds for t in plan.trials))} "
        f"of trial time; {plan.concurrent} trial(s) at once ({where}) -> about {duration(plan.train_wall_seconds)}.",
        f"Evaluation: {plan.checkpoints} checkpoint(s), {plan.eval_images:,} test images in all, x k={plan.eval_k:,}"
        + (
            f", then AIS ({space.evaluation.ais.steps:,} steps, {space.evaluation.ais.chains} chains) on "
            f"{plan.ais_images:,} of them"
            if plan.ais_images
            else ""
        )
        + f" -> about {duration(plan.eval_seconds)}, {space.resources.eval_actors} at a time once training ends"
        + (
            " (with best: each, a trial's evaluation starts when it finishes if resources are free and no trial "
            "waits for them: part of it can overlap the training)."
            if space.evaluation.best == "each"
            else "."
        ),
        f"Estimated wall time: {duration(plan.wall_seconds)}."
        + (
            " With ASHA, trials worse than the ones before them stop early: the real time is less, and this "
            "figure is a bound, not an estimate."
            if asha
            else ""
        ),
        "",
        f"An estimate, calibrated by timing {CALIBRATION_STEPS} training steps per model and a {CALIBRATION_IMAGES}"
        f"-image k-sample evaluation{' and AIS' if plan.ais_images else ''} on this machine ({plan.device}, "
        f"{plan.threads} thread(s) per trial as Ray "
        f"gives it); another device (a cluster's GPUs) runs at its own speed. Ray's start-up and checkpoint "
        f"uploads are not counted.",
    ]
    return "\n".join(lines)


def dry_run(space: SweepSpace, address: str | None, max_concurrent: int, asha: bool = False) -> str:
    """The plan of `space` as text: trials, evaluation work and estimated times."""
    resources = space.resources
    if address:
        init_ray(address)
        available = ray.cluster_resources()
        cpus, gpus = available.get("CPU", 0), available.get("GPU", 0)
        where = f"the cluster at {address} as it is now: {cpus:g} CPUs, {gpus:g} GPUs"
    else:
        cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
        where = f"a local Ray: {cpus:g} CPUs, {gpus:g} GPUs"
    concurrent = int(cpus // resources.cpus_per_trial)
    if resources.gpus_per_trial and gpus:
        concurrent = min(concurrent, int(gpus // resources.gpus_per_trial))
    elif resources.gpus_per_trial:
        where += (
            f"; the trials ask for {resources.gpus_per_trial:g} GPU each and there is none now (an autoscaling "
            f"cluster adds them on demand; --gpus-per-trial 0 runs on CPU): estimated as if they ran on CPU"
        )
    if concurrent < 1:
        raise ClusterError(
            f"no trial fits ({where}; each asks for {resources.cpus_per_trial:g} CPU and "
            f"{resources.gpus_per_trial:g} GPU): lower --cpus-per-trial or --gpus-per-trial"
        )
    space = space.with_asha() if asha else space
    limit = max_concurrent or (space.search.max_concurrent if space.search else None) or concurrent
    concurrent = min(concurrent, limit, len(drawn_trials(space)))
    use_gpu = resources.gpus_per_trial > 0 and torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    eval_threads = 1 if resources.eval_gpus else int(max(1, cpus // resources.eval_actors))
    return plan_text(space, plan_sweep(space, device, concurrent, eval_threads), where, space.early_stopped)
