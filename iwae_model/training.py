"""Train one model (any registered objective: VAE / IWAE / MIWAE / CIWAE / PIWAE / VR / RWS, or a
plugin's) with Burda et al.'s schedule
(the command line: python -m iwae_model.train).

Schedule: stage i = 0..7 runs 3^i passes at lr 0.001 * 10^(-i/7) (3,280 passes in all),
batch 20, Adam eps 1e-4 with its state kept across stages. `--passes N` compresses the
schedule proportionally: every stage keeps its share of the N passes' optimizer steps.
Training images are visited in their file order every pass, as in the authors' code.

A run directory gets `checkpoint.pt` (written atomically after every pass) and `metrics.jsonl`, one
JSON object per pass with these fields:
  epoch          passes completed
  step           optimizer steps completed
  stage          schedule stage (0..7) at the end of the pass
  lr             learning rate at the end of the pass
  train_bound    mean training objective over the pass's batches (nats, higher is better)
  valid_bound    the objective's bound on the validation images (binarized once)
  valid_ll       k-sample log-likelihood estimate on the validation images (k = --valid-ll-k;
                 null when 0): comparable across objectives, K and M, unlike the bounds
  test_bound     the objective's bound on the test images (every --eval-every passes, else null)
  test_nll       k-sample NLL estimate on --nll-images test images (every --nll-every, else null)
  active_units   active units per stochastic layer (Burda's definition)
  train_seconds  cumulative seconds spent training (evaluation excluded)
  images_per_s   training images per second during the pass
  snr            gradient SNR summaries (every --snr-every passes, else null): encoder_mean,
                 encoder_median, decoder_mean, decoder_median (and per layer for 2 layers)
  generator_reseeded  true for the first pass of a run resumed on another device type (see below)
Running the same command again resumes from the checkpoint and ends bit-identical to a run
that never stopped (same seed, same device type). Resumed on the other device type (a
checkpoint written on a GPU, continued on a CPU, or the reverse), it continues from the same
weights, optimizer state and position, but the training generator's state cannot carry over:
it is seeded from (seed, step) instead, the pass's row says `generator_reseeded`, and from that
pass on the run is not bit-identical to one that never moved.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import likelihood
from .checkpoint import checkpoint_path, load_checkpoint, restore, rng_state, save_checkpoint
from .config import FULL_SCHEDULE_PASSES, TrainConfig
from .data import Dataset
from .datasets import load_dataset
from .device import pin_float32
from .errors import IWAEError
from .files import write_atomically
from .likelihood import burda_active_units
from .models import IWAEModel
from .objectives import GradientEstimator, Objective, Surrogate
from .plugins import sources_of
from .snr import gradient_snr
from .torch_private import deterministic_inductor

STAGES = 8
SNR_SEED = 0  # the SNR's minibatch binarization and gradient noise: the same every measurement
NONFINITE_CHECK_EVERY = 100  # steps between checks of the running loss (each check syncs a GPU)


class ConfigMismatch(IWAEError, ValueError):
    """The run directory holds a checkpoint of another configuration."""


class NonFiniteLoss(IWAEError, RuntimeError):
    """Training produced a NaN or infinite objective; the last good checkpoint is untouched."""


def stage_boundaries(steps_per_epoch: int, passes: int, schedule: str) -> list[int]:
    """First optimizer step of each stage 1..7. Stage i ends after (3^{i+1} - 1) / 2 of the
    3,280 passes. `compressed` scales that to `passes` (every stage keeps its share of the
    run); `truncated` keeps the full schedule's boundaries and stops after `passes`, so a short
    run is exactly the start of a full one (most of it at the first learning rates); `constant`
    has one stage (Burda's second stage of Table 2: lr 1e-4 throughout)."""
    if schedule == "constant":
        return []
    ends = [(3 ** (i + 1) - 1) // 2 for i in range(STAGES - 1)]
    if schedule == "truncated":
        return [end * steps_per_epoch for end in ends]
    return [round(steps_per_epoch * passes * end / FULL_SCHEDULE_PASSES) for end in ends]


def stage_at(step: int, boundaries: list[int]) -> int:
    return sum(step >= b for b in boundaries)


def stage_lr(base_lr: float, stage: int) -> float:
    return base_lr * 10 ** (-stage / 7)


def build_optimizer(model: IWAEModel, config: TrainConfig) -> torch.optim.Optimizer:
    # fused: one kernel for all parameters instead of ~10 per tensor; at batch 20 the per-op
    # overhead of textbook Adam is a third of a VAE step on CPU.
    return torch.optim.Adam(
        model.parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, fused=True
    )


SurrogateFn = Callable[[torch.Tensor, list[torch.Tensor]], Surrogate]


def build_surrogate(
    model: IWAEModel, objective: Objective, estimator: GradientEstimator, compile: bool = False
) -> SurrogateFn:
    """(binary images, q-noise) -> the estimator's surrogate losses; with `compile`, forward and
    backward become a few fused kernels instead of ~100 small ops."""

    sampling = estimator.sampling_options

    def surrogate(x: torch.Tensor, noise: list[torch.Tensor]) -> Surrogate:
        log_w = model.log_weights(x, noise=noise, **sampling)
        return objective.surrogate(log_w, estimator.name)

    if not compile:
        return surrogate
    if next(model.parameters()).device.type == "cuda":
        deterministic_inductor()  # kernel variants not chosen by timing: a resumed run sums alike
    return torch.compile(surrogate, dynamic=False)


def train_step(
    model: IWAEModel,
    optimizer: torch.optim.Optimizer,
    surrogate: SurrogateFn,
    num_samples: int,
    x: torch.Tensor,
    generator: torch.Generator,
    params: tuple[list[nn.Parameter], list[nn.Parameter]],
) -> torch.Tensor:
    """One optimizer step on binary images x; returns the batch's summed bound (detached, not
    synchronised, so a GPU is never waited on here)."""
    # Drawn here, outside a compiled graph (a torch.Generator cannot enter one); the same draws
    # in the same order as model.log_weights would make itself.
    noise = model.draw_noise(num_samples, x.shape[0], generator)
    losses = surrogate(x, noise)
    optimizer.zero_grad(set_to_none=True)
    losses.backward(*params)
    optimizer.step()
    return -losses.decoder_loss.detach()


class InitError(IWAEError, ValueError):
    """--init-from names a run that cannot start this one; the message says why and the fix."""


def continuation_seed(seed: int, step: int) -> int:
    """The training generator's seed for a run resumed on another device type after `step`
    steps: a function of (seed, step) only, so such a resume is reproducible."""
    return int(np.random.SeedSequence([seed % 2**64, step]).generate_state(1, np.uint64)[0])


def write_metrics(run_dir: Path, history: list[dict], durable: bool = True) -> None:
    """Rewrite metrics.jsonl from the checkpoint's history (whole; fsynced when `durable`), so a
    resumed run never shows rows of a pass that was lost in a crash."""
    text = "".join(json.dumps(row) + "\n" for row in history).encode()
    write_atomically(run_dir / "metrics.jsonl", lambda out: out.write(text), durable)


class TrainingRun:
    """One training run's state -- model, optimizer, generator, per-pass history and position --
    and its passes: `start` (fresh, or from a parent's final weights) or `resume` a checkpoint,
    then `train_pass` and `measure` until `done`, `save` after each."""

    def __init__(self, config: TrainConfig, data: Dataset, device: torch.device):
        self.config, self.data, self.device = config, data, torch.device(device)
        self.train_x = data.train[: config.train_images]
        self.valid_x, self.test_x = data.binarized_once("valid"), data.binarized_once("test")[: config.test_images]
        # The SNR's fixed minibatch, binarized once (its own generator, like the SNR's draws).
        self.snr_x = (
            data.training_batch(
                self.train_x[: config.snr_images], torch.Generator(device=self.device).manual_seed(SNR_SEED)
            )
            if config.snr_every
            else None
        )
        self.steps_per_epoch = len(self.train_x) // config.batch_size
        self.boundaries = stage_boundaries(self.steps_per_epoch, config.passes, config.schedule)
        self.objective, self.estimator = config.build_objective(), config.build_estimator()
        self.plugins = sources_of(config)  # those defining the objective and dataset, if any
        torch.manual_seed(config.seed)
        self.model = config.build_model(train_mean=self.train_x.mean(0).cpu()).to(self.device)
        self.optimizer = build_optimizer(self.model, config)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.history: list[dict] = []
        self.epoch = self.step = 0
        self.train_seconds = 0.0
        self.reseeded = False  # the next pass runs on a generator reseeded by a cross-device resume
        self.surrogate = build_surrogate(self.model, self.objective, self.estimator, config.compile)
        self.params = self.model.encoder_parameters(), self.model.decoder_parameters()
        self.bound_sum = torch.zeros((), device=self.device)
        self.epoch_seconds = 0.0

    @classmethod
    def start(
        cls, config: TrainConfig, data: Dataset, device: torch.device, parent: dict[str, Any] | None = None
    ) -> TrainingRun:
        """A new run; with `parent` (a checked checkpoint state: Burda's Table 2), from its final
        weights, and its Adam state with `init_optimizer`."""
        if config.init_label is not None and parent is None:
            raise InitError(
                f"{config.label()} continues {config.init_label}, but no checkpoint of it is given (init_from): "
                f"a continued run never starts from random weights"
            )
        run = cls(config, data, device)
        if parent is not None:
            run._continue_from(parent)
        return run

    @classmethod
    def resume(
        cls, config: TrainConfig, data: Dataset, device: torch.device, state: dict[str, Any], source: str | os.PathLike
    ) -> TrainingRun:
        """The run a checked checkpoint `state` (read from `source`) holds, at its position."""
        # Through TrainConfig, so that a checkpoint from before a setting existed has its default.
        saved = TrainConfig.from_dict(state["config"]).to_dict()
        if saved != config.to_dict():
            differing = sorted(k for k, v in config.to_dict().items() if saved[k] != v)
            raise ConfigMismatch(
                f"{source} holds a run with a different configuration (differs in {differing}); "
                f"use another --out, or delete {source} to start over"
            )
        run = cls(config, data, device)
        restore(state, source, run.model, run.optimizer, run.generator)
        run.epoch, run.step, run.history = state["epoch"], state["step"], state["history"]
        run.train_seconds = state["train_seconds"]
        if state["rng"]["device"] != run.device.type:
            run.generator.manual_seed(continuation_seed(config.seed, run.step))
            run.reseeded = True
            print(
                f"{config.label()}: resumed on {run.device.type} from a checkpoint written on "
                f"{state['rng']['device']}: same weights, optimizer and position, the training generator seeded "
                f"from (seed {config.seed}, step {run.step}); from pass {run.epoch + 1} on this run is not "
                f"bit-identical to one that never moved",
                file=sys.stderr,
                flush=True,
            )
        return run

    def _continue_from(self, parent: dict[str, Any]) -> None:
        config = TrainConfig.from_dict(parent["config"])
        # Compared as built, so that Burda's default sizes and the same sizes spelled out agree.
        shape = [(m.latent_dims, m.hidden_dims) for m in (config.build_model(), self.model)]
        if shape[0] != shape[1]:
            raise InitError(
                f"--init-from {self.config.init_from}: its model ({config.label()}: latent sizes "
                f"{shape[0][0]}, hidden sizes {shape[0][1]}) has another architecture than this run's "
                f"(latent sizes {shape[1][0]}, hidden sizes {shape[1][1]}); continue it with its own "
                f"layers and sizes"
            )
        restore(parent, self.config.init_from, self.model, self.optimizer if self.config.init_optimizer else None)

    @property
    def done(self) -> bool:
        return self.epoch >= self.config.passes

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.passes

    def train_pass(self, bar: tqdm | None = None) -> None:
        """One pass over the training images, in their file order, at the schedule's rates."""
        config, optimizer = self.config, self.optimizer
        self.model.train()
        self.bound_sum = torch.zeros((), device=self.device)
        epoch_start = time.perf_counter()
        for b in range(self.steps_per_epoch):
            lr = stage_lr(config.lr, stage_at(self.step, self.boundaries))
            if optimizer.param_groups[0]["lr"] != lr:
                optimizer.param_groups[0]["lr"] = lr
            x = self.data.training_batch(
                self.train_x[b * config.batch_size : (b + 1) * config.batch_size], self.generator
            )
            self.bound_sum += train_step(
                self.model, optimizer, self.surrogate, self.objective.num_samples, x, self.generator, self.params
            )
            self.step += 1
            if (b + 1) % NONFINITE_CHECK_EVERY == 0 or b + 1 == self.steps_per_epoch:
                if not torch.isfinite(self.bound_sum):
                    raise NonFiniteLoss(
                        f"{config.label()}: the training objective became {self.bound_sum.item()} in pass "
                        f"{self.epoch + 1} (step {self.step}, lr {lr:.3g}). The last good checkpoint (after pass "
                        f"{self.epoch}) is kept; lower --lr or check the data before resuming."
                    )
                if bar is not None:
                    bar.update((b + 1) % NONFINITE_CHECK_EVERY or NONFINITE_CHECK_EVERY)
                    bar.set_postfix(
                        bound=f"{self.bound_sum.item() / ((b + 1) * config.batch_size):.2f}", lr=f"{lr:.2g}"
                    )
        self.epoch_seconds = time.perf_counter() - epoch_start
        self.train_seconds += self.epoch_seconds
        self.epoch += 1

    def measure(self) -> dict[str, Any]:
        """The pass just trained as a metrics row (appended to the history)."""
        config, model, epoch, data = self.config, self.model, self.epoch, self.data
        model.eval()
        test_due = epoch % config.eval_every == 0 or epoch == config.passes
        nll_due = config.nll_every and (epoch % config.nll_every == 0 or epoch == config.passes)
        snr_due = config.snr_every and (epoch % config.snr_every == 0 or epoch == config.passes)
        test_x = self.test_x
        # Each estimate draws the evaluation's own noise: the same every pass, and the same
        # figures as python -m iwae_model.evaluate on the same images.
        row = {
            "epoch": epoch,
            "step": self.step,
            "stage": stage_at(self.step - 1, self.boundaries),
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_bound": self.bound_sum.item() / (self.steps_per_epoch * config.batch_size),
            "valid_bound": likelihood.bound(model, self.valid_x, self.objective).mean().item(),
            "valid_ll": likelihood.log_likelihood(model, self.valid_x, config.valid_ll_k).mean().item()
            if config.valid_ll_k
            else None,
            "test_bound": likelihood.bound(model, test_x, self.objective).mean().item() if test_due else None,
            "test_nll": -likelihood.log_likelihood(model, test_x[: config.nll_images], config.nll_k).mean().item()
            if nll_due
            else None,
            "active_units": burda_active_units(model, data),
            "train_seconds": self.train_seconds,
            "images_per_s": self.steps_per_epoch * config.batch_size / self.epoch_seconds,
            "snr": self._snr() if snr_due else None,
            "generator_reseeded": self.reseeded,
        }
        self.reseeded = False
        self.history.append(row)
        return row

    def _snr(self) -> dict[str, float]:
        # Its own generators: measuring the SNR never changes the training run.
        return gradient_snr(
            self.model,
            self.objective,
            self.estimator,
            self.snr_x,
            self.config.snr_draws,
            torch.Generator(device=self.device).manual_seed(SNR_SEED),
        )

    def checkpoint(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically (the fields of iwae_model.checkpoint)."""
        return {
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "rng": rng_state(self.generator),
            "history": self.history,
            "train_seconds": self.train_seconds,
            **({"plugins": self.plugins} if self.plugins else {}),
        }

    def save(self, folder: str | os.PathLike, durable: bool = True) -> None:
        """`checkpoint.pt` and `metrics.jsonl` in `folder`; `durable`: each written whole or not at all."""
        save_checkpoint(checkpoint_path(folder), self.checkpoint(), durable)
        write_metrics(Path(folder), self.history, durable)


def open_run(config: TrainConfig, run_dir: Path, data: Dataset, device: torch.device) -> TrainingRun:
    """The run in `run_dir`: resumed from its checkpoint, or started (from `config.init_from`'s
    final weights for a continued run)."""
    if checkpoint_path(run_dir).exists():
        return TrainingRun.resume(
            config, data, device, load_checkpoint(run_dir, map_location=device), checkpoint_path(run_dir)
        )
    parent = load_checkpoint(config.init_from, map_location=device) if config.init_from is not None else None
    return TrainingRun.start(config, data, device, parent)


def train(
    config: TrainConfig,
    run_dir: str | os.PathLike,
    data: Dataset | None = None,
    data_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    on_epoch_end: Callable[[TrainingRun], None] | None = None,
) -> list[dict]:
    """Train (or resume) the run in `run_dir`; return its per-pass metrics. `on_epoch_end(run)`
    is called with the live run after each pass's checkpoint is on disk."""
    pin_float32()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    data = data or load_dataset(config.dataset, data_dir, device, config.binarization)
    run = open_run(config, run_dir, data, device)
    if run.epoch:  # resumed: no row of a pass lost in a crash stays in metrics.jsonl
        write_metrics(run_dir, run.history)
    with tqdm(
        total=run.total_steps,
        initial=run.step,
        desc=config.label(),
        unit="step",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:
        while not run.done:
            run.train_pass(bar)
            run.measure()
            run.save(run_dir)
            if on_epoch_end is not None:
                on_epoch_end(run)
    return run.history
