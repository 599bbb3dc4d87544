"""Train one VAE / IWAE / MIWAE / CIWAE / PIWAE on MNIST with Burda et al.'s schedule.

    python -m iwae_model.train --layers 1 --objective iwae --k 5 --passes 3 --out RUN_DIR

Schedule: stage i = 0..7 runs 3^i passes at lr 0.001 * 10^(-i/7) (3,280 passes in all),
batch 20, Adam eps 1e-4 with its state kept across stages. `--passes N` compresses the
schedule proportionally: every stage keeps its share of the N passes' optimizer steps.
Training images are visited in their file order every pass, as in the authors' code.

RUN_DIR gets `checkpoint.pt` (written atomically after every pass) and `metrics.jsonl`, one
JSON object per pass with these fields:
  epoch          passes completed
  step           optimizer steps completed
  stage          schedule stage (0..7) at the end of the pass
  lr             learning rate at the end of the pass
  train_bound    mean training objective over the pass's batches (nats, higher is better)
  valid_bound    the objective's bound on the 400 validation images (fixed binarization)
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

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import likelihood
from .likelihood import burda_active_units
from .checkpoint import CheckpointError, checkpoint_path, load_checkpoint, restore, rng_state, save_checkpoint
from .config import FULL_SCHEDULE_PASSES, SCHEDULES, TrainConfig
from .data import MNIST, MNISTError, load_mnist
from .device import pin_float32, resolve_device
from .models import IWAEModel
from .objectives import ESTIMATORS, OBJECTIVES, GradientEstimator, Objective, Surrogate
from .snr import gradient_snr

STAGES = 8
SNR_SEED = 0  # the SNR's minibatch binarization and gradient noise: the same every measurement
NONFINITE_CHECK_EVERY = 100  # steps between checks of the running loss (each check syncs a GPU)


class ConfigMismatch(ValueError):
    """The run directory holds a checkpoint of another configuration."""


class NonFiniteLoss(RuntimeError):
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
        model.parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
        fused=True)


SurrogateFn = Callable[[torch.Tensor, list[torch.Tensor]], Surrogate]


def build_surrogate(model: IWAEModel, objective: Objective, estimator: GradientEstimator,
                    compile: bool = False) -> SurrogateFn:
    """(binary images, q-noise) -> the estimator's surrogate losses; with `compile`, forward and
    backward become a few fused kernels instead of ~100 small ops."""
    def surrogate(x: torch.Tensor, noise: list[torch.Tensor]) -> Surrogate:
        log_w = model.log_weights(x, noise=noise, stop_q_params=estimator.stop_q_params)
        return estimator.surrogate(objective, log_w)

    if not compile:
        return surrogate
    if next(model.parameters()).device.type == "cuda":
        # Inductor otherwise picks among kernel variants by timing them when it compiles: a
        # resumed run could pick others, and sum in another order.
        torch._inductor.config.deterministic = True
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


class InitError(ValueError):
    """--init-from names a run that cannot start this one; the message says why and the fix."""


def load_initial_state(config: TrainConfig, source: str | os.PathLike, model: IWAEModel,
                       optimizer: torch.optim.Optimizer) -> None:
    """Start from the parent run's final weights (and Adam state with `init_optimizer`)."""
    state = load_checkpoint(source, map_location=next(model.parameters()).device)
    parent = TrainConfig.from_dict(state["config"])
    # Compared as built, so that Burda's default sizes and the same sizes spelled out agree.
    shape = [(m.latent_dims, m.hidden_dims) for m in (parent.build_model(), model)]
    if shape[0] != shape[1]:
        raise InitError(f"--init-from {config.init_from}: its model ({parent.label()}: latent sizes {shape[0][0]}, "
                        f"hidden sizes {shape[0][1]}) has another architecture than this run's (latent sizes "
                        f"{shape[1][0]}, hidden sizes {shape[1][1]}); continue it with its own layers and sizes")
    restore(state, source, model, optimizer if config.init_optimizer else None)


def continuation_seed(seed: int, step: int) -> int:
    """The training generator's seed for a run resumed on another device type after `step`
    steps: a function of (seed, step) only, so such a resume is reproducible."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0])


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """Rewrite metrics.jsonl from the checkpoint's history (atomically), so a resumed run never
    shows rows of a pass that was lost in a crash."""
    tmp = run_dir / ".metrics.jsonl.tmp"
    with tmp.open("w") as out:
        out.write("".join(json.dumps(row) + "\n" for row in history))
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, run_dir / "metrics.jsonl")


def train(
    config: TrainConfig,
    run_dir: str | os.PathLike,
    data: MNIST | None = None,
    data_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    on_epoch_end: Callable[[dict, Path], None] | None = None,
    init_source: str | os.PathLike | None = None,
) -> list[dict]:
    """Train (or resume) the run in `run_dir`; return its per-pass metrics.

    `on_epoch_end(metrics_row, checkpoint_path)` is called after each pass's checkpoint is on
    disk (the Ray trainable reports from there). A run with `config.init_from` starts from that
    run's checkpoint, read from `init_source` when given (a local copy of a remote one)."""
    pin_float32()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    data = data or load_mnist(data_dir, device, config.binarization)
    train_x = data.train[:config.train_images]
    steps_per_epoch = len(train_x) // config.batch_size
    total_steps = steps_per_epoch * config.passes
    boundaries = stage_boundaries(steps_per_epoch, config.passes, config.schedule)
    objective, estimator = config.build_objective(), config.build_estimator()

    torch.manual_seed(config.seed)
    model = config.build_model(train_mean=train_x.mean(0).cpu()).to(device)
    optimizer = build_optimizer(model, config)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    history: list[dict] = []
    epoch = step = 0
    train_seconds = 0.0
    reseeded = False

    if checkpoint_path(run_dir).exists():
        state = load_checkpoint(run_dir, map_location=device)
        # Through TrainConfig, so that a checkpoint from before a setting existed has its default.
        saved = TrainConfig.from_dict(state["config"]).to_dict()
        if saved != config.to_dict():
            differing = sorted(k for k, v in config.to_dict().items() if saved[k] != v)
            raise ConfigMismatch(
                f"{run_dir} holds a run with a different configuration (differs in {differing}); "
                f"use another --out, or delete {checkpoint_path(run_dir)} to start over")
        restore(state, checkpoint_path(run_dir), model, optimizer, generator)
        epoch, step, history, train_seconds = state["epoch"], state["step"], state["history"], state["train_seconds"]
        if state["rng"]["device"] != device.type:
            generator.manual_seed(continuation_seed(config.seed, step))
            reseeded = True
            print(f"{config.label()}: resumed on {device.type} from a checkpoint written on {state['rng']['device']}: "
                  f"same weights, optimizer and position, the training generator seeded from (seed {config.seed}, "
                  f"step {step}); from pass {epoch + 1} on this run is not bit-identical to one that never moved",
                  file=sys.stderr, flush=True)
        write_metrics(run_dir, history)
    elif config.init_from is not None:
        load_initial_state(config, init_source or config.init_from, model, optimizer)

    params = model.encoder_parameters(), model.decoder_parameters()
    surrogate = build_surrogate(model, objective, estimator, config.compile)
    valid_x = data.fixed("valid")
    test_x = data.fixed("test")[:config.test_images]
    snr_x = (data.training_batch(train_x[:config.snr_images], torch.Generator(device=device).manual_seed(SNR_SEED))
             if config.snr_every else None)
    bar = tqdm(total=total_steps, initial=step, desc=config.label(), unit="step", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    while epoch < config.passes:
        model.train()
        bound_sum = torch.zeros((), device=device)
        epoch_start = time.perf_counter()
        for b in range(steps_per_epoch):
            stage = stage_at(step, boundaries)
            lr = stage_lr(config.lr, stage)
            if optimizer.param_groups[0]["lr"] != lr:
                optimizer.param_groups[0]["lr"] = lr
            x = data.training_batch(train_x[b * config.batch_size:(b + 1) * config.batch_size], generator)
            bound_sum += train_step(model, optimizer, surrogate, objective.num_samples, x, generator, params)
            step += 1
            if (b + 1) % NONFINITE_CHECK_EVERY == 0 or b + 1 == steps_per_epoch:
                if not torch.isfinite(bound_sum):
                    bar.close()
                    raise NonFiniteLoss(
                        f"{config.label()}: the training objective became {bound_sum.item()} in pass {epoch + 1} "
                        f"(step {step}, lr {lr:.3g}). The last good checkpoint (after pass {epoch}) is kept in "
                        f"{run_dir}; lower --lr or check the data before resuming.")
                bar.update((b + 1) % NONFINITE_CHECK_EVERY or NONFINITE_CHECK_EVERY)
                bar.set_postfix(bound=f"{bound_sum.item() / ((b + 1) * config.batch_size):.2f}", lr=f"{lr:.2g}")
        epoch_seconds = time.perf_counter() - epoch_start
        train_seconds += epoch_seconds
        epoch += 1

        model.eval()
        test_due = epoch % config.eval_every == 0 or epoch == config.passes
        nll_due = config.nll_every and (epoch % config.nll_every == 0 or epoch == config.passes)
        snr_due = config.snr_every and (epoch % config.snr_every == 0 or epoch == config.passes)
        # Each estimate draws from a fresh evaluation generator: the same noise every pass,
        # and the same figures as python -m iwae_model.evaluate on the same images.
        row = {
            "epoch": epoch,
            "step": step,
            "stage": stage_at(step - 1, boundaries),
            "lr": optimizer.param_groups[0]["lr"],
            "train_bound": bound_sum.item() / (steps_per_epoch * config.batch_size),
            "valid_bound": likelihood.bound(model, valid_x, objective).mean().item(),
            "test_bound": likelihood.bound(model, test_x, objective).mean().item() if test_due else None,
            "test_nll": -likelihood.log_likelihood(
                model, test_x[:config.nll_images], config.nll_k).mean().item() if nll_due else None,
            "active_units": burda_active_units(model, data),
            "train_seconds": train_seconds,
            "images_per_s": steps_per_epoch * config.batch_size / epoch_seconds,
            # Its own generator: measuring the SNR never changes the training run.
            "snr": gradient_snr(model, objective, estimator, snr_x, config.snr_draws,
                                torch.Generator(device=device).manual_seed(SNR_SEED)) if snr_due else None,
            "generator_reseeded": reseeded,
        }
        reseeded = False
        history.append(row)
        save_checkpoint(checkpoint_path(run_dir), {
            "config": config.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": epoch, "step": step, "rng": rng_state(generator), "history": history,
            "train_seconds": train_seconds,
        })
        write_metrics(run_dir, history)
        if on_epoch_end is not None:
            on_epoch_end(row, checkpoint_path(run_dir))
    bar.close()
    return history


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m iwae_model.train",
        description="Train one model with Burda et al.'s protocol; resumable (run the same command again).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="run directory (checkpoint.pt, metrics.jsonl)")
    p.add_argument("--layers", type=int, default=d.layers, choices=[1, 2], help="stochastic layers")
    p.add_argument("--objective", default=d.objective, choices=OBJECTIVES,
                   help="vae = k-sample Monte-Carlo ELBO; miwae/piwae are Rainforth et al.'s (M, K) objectives")
    p.add_argument("--k", type=int, default=d.k, help="importance samples K (per group for miwae/piwae)")
    p.add_argument("--m", type=int, default=d.m, help="groups M for miwae/piwae (vae uses M*K samples)")
    p.add_argument("--beta", type=float, default=d.beta, help="CIWAE mixing weight of the ELBO")
    p.add_argument("--estimator", default=d.estimator, choices=ESTIMATORS,
                   help="encoder gradient: reparam (standard), stl (Roeder et al. 2017), dreg (Tucker et al. 2019; 1 layer only)")
    p.add_argument("--passes", type=int, default=d.passes,
                   help=f"passes over the training set; fewer than {FULL_SCHEDULE_PASSES} compresses the schedule proportionally")
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES,
                   help="for --passes below 3280: compressed keeps every stage's share; truncated runs the first N passes of the full schedule")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate of stage 0")
    p.add_argument("--adam-beta1", type=float, default=d.adam_beta1, help="Adam beta1: 0.9 is textbook Adam (and the Cambridge replication's reading of the paper); the authors' code used 0.99")
    p.add_argument("--adam-eps", type=float, default=d.adam_eps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--binarization", default=d.binarization, choices=["dynamic", "static", "threshold"],
                   help="dynamic is the papers' protocol; static/threshold are NOT comparable to the papers")
    p.add_argument("--train-images", type=int, default=None, help="train on the first N images only (not comparable)")
    p.add_argument("--test-images", type=int, default=None, help="per-pass test bound on the first N test images only")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="passes between test-bound evaluations")
    p.add_argument("--nll-every", type=int, default=d.nll_every, help="passes between k-sample NLL estimates (0: never)")
    p.add_argument("--nll-k", type=int, default=d.nll_k)
    p.add_argument("--nll-images", type=int, default=d.nll_images)
    p.add_argument("--snr-every", type=int, default=d.snr_every,
                   help="passes between gradient-SNR measurements (Rainforth et al. 2018; 0: never)")
    p.add_argument("--snr-draws", type=int, default=d.snr_draws, help="gradient draws per SNR measurement")
    p.add_argument("--snr-images", type=int, default=d.snr_images,
                   help="the SNR's fixed minibatch: the first N training images")
    p.add_argument("--init-from", metavar="RUN_DIR",
                   help="start from this run's final weights (Burda's Table 2: with --lr 1e-4 --passes 2187 "
                        "--schedule constant); the optimizer starts fresh unless --init-optimizer")
    p.add_argument("--init-optimizer", action="store_true", help="with --init-from: also continue its Adam state")
    p.add_argument("--data-dir", default=None, help="MNIST folder (default: $IWAE_DATA_DIR, then ~/.cache/iwae-sweep/mnist)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the surrogate loss, forward and backward: faster small-batch steps after ~10 s of compilation")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        config = TrainConfig(
            layers=args.layers, objective=args.objective, k=args.k, m=args.m, beta=args.beta,
            estimator=args.estimator, passes=args.passes, schedule=args.schedule, batch_size=args.batch_size, lr=args.lr,
            adam_beta1=args.adam_beta1, adam_eps=args.adam_eps, seed=args.seed, binarization=args.binarization,
            train_images=args.train_images, test_images=args.test_images, eval_every=args.eval_every,
            nll_every=args.nll_every, nll_k=args.nll_k, nll_images=args.nll_images, snr_every=args.snr_every,
            snr_draws=args.snr_draws, snr_images=args.snr_images, compile=args.compile,
            init_from=str(Path(args.init_from).resolve()) if args.init_from else None,
            init_label=parent_label(args.init_from) if args.init_from else None, init_optimizer=args.init_optimizer)
    except (ValueError, CheckpointError) as exc:
        p.error(str(exc))
    return config, args


def parent_label(init_from: str) -> str:
    """The label of the run a continued run starts from (read from its checkpoint)."""
    return TrainConfig.from_dict(load_checkpoint(init_from)["config"]).label()


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    device = resolve_device(args.device)
    try:
        history = train(config, args.out, data_dir=args.data_dir, device=device, progress=not args.no_progress)
    except (CheckpointError, ConfigMismatch, InitError, MNISTError, NonFiniteLoss) as error:
        sys.exit(f"error: {error}")
    last = history[-1]
    print(json.dumps({"run_dir": str(Path(args.out).resolve()), "label": config.label(), **last}))


if __name__ == "__main__":
    main()
