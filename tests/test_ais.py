"""AIS and BDMC (iwae_model/ais.py) against answers known another way: log p(x) by quadrature for
a 2-D latent, importance sampling for a one-distribution schedule, BDMC's sandwich on data
simulated from the model, and the k=5000 IS estimate they are meant to improve on."""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import random_binary, small_mnist
from test_objectives import exact_log_px_one_layer, exact_log_px_two_layers

from iwae_model import TrainConfig, build_model
from iwae_model.ais import ais, ais_log_likelihood, bdmc, sigmoid_schedule
from iwae_model.checkpoint import load_model
from iwae_model.evaluate import main
from iwae_model.likelihood import log_likelihood
from iwae_model.training import train


def standard_errors(log_weights: torch.Tensor) -> torch.Tensor:
    """Per image, the delta-method standard error of a log-mean-exp over chains: sqrt(1/ESS - 1/C)."""
    normalised = torch.softmax(log_weights, dim=0)
    return (normalised.square().sum(0) - 1 / len(log_weights)).clamp(min=0).sqrt()


@pytest.fixture(scope="module")
def flat_run(mnist, tmp_path_factory):
    """A 2-D latent model trained for seconds as a VAE (k=1) on 1,000 real MNIST images, and
    log p(x) of 8 test images by quadrature. Its narrow encoder leaves IS at k=5000 most of a
    nat short on some images (ESS near 1). The grid (121 points a side over [-6, 6], spacing 0.1
    against posterior widths of 0.1 and more) agreed with 241- and 401-point grids to 1e-7 nats
    when this test was written."""
    run_dir = tmp_path_factory.mktemp("flat")
    data = small_mnist(mnist, train=1000, test=100)
    config = TrainConfig(
        objective="vae",
        k=1,
        passes=10,
        train_images=1000,
        test_images=100,
        latent_dims=(2,),
        hidden_dims=(64,),
        schedule="constant",
        lr=3e-3,
        seed=0,
    )
    train(config, run_dir, data, progress=False)
    model, _, _ = load_model(run_dir)
    x = data.binarized_once("test")[:8]
    exact = exact_log_px_one_layer(copy.deepcopy(model).double(), x, half_width=6.0, points=121)
    return run_dir, model, x, exact


@pytest.fixture(scope="module")
def few_pass_model(mnist, tmp_path_factory):
    """Burda's 1-layer architecture (50 latents) after 8 passes over 2,000 real MNIST images (an
    NLL near 162 nats, IS's ESS about 20 of 5,000)."""
    run_dir = tmp_path_factory.mktemp("few_passes")
    data = small_mnist(mnist, train=2000, test=100)
    train(TrainConfig(k=5, passes=8, train_images=2000, test_images=100, seed=0), run_dir, data, progress=False)
    model, _, _ = load_model(run_dir)
    return model, data.binarized_once("test")[:32]


def test_sigmoid_schedule_runs_from_0_to_1_densest_at_the_ends():
    assert sigmoid_schedule(1) == [0.0, 1.0]
    betas = torch.tensor(sigmoid_schedule(100), dtype=torch.float64)
    steps = betas.diff()
    assert betas[0] == 0 and betas[-1] == 1 and len(betas) == 101 and (steps > 0).all()
    assert torch.allclose(steps, steps.flip(0))  # symmetric about beta = 1/2
    assert steps[0] < steps[50] / 10  # sigmoid slope at 4 over that at 0: 1/14


def test_ais_matches_quadrature_and_beats_is_at_k5000(flat_run):
    _, model, x, exact = flat_run
    result = ais(model, x, steps=150, chains=32)
    error = result.log_likelihood - exact
    se = standard_errors(result.log_weights)
    z = error.mean() / (se.square().sum().sqrt() / len(x))
    # Within Monte-Carlo error of the exact value; below it rather than above, as a finite schedule's
    # bias goes (measured: mean error -0.05, z -1.6). A missing log-weight term is off by nats.
    assert -4 < z < 3, (error, se)
    assert error.abs().max() < 0.5, error
    is_error = log_likelihood(model, x, k=5000) - exact  # measured: mean |error| 0.79 nats, AIS's 0.05
    assert error.abs().mean() < is_error.abs().mean() / 3, (error, is_error)
    # The frozen step sizes were tuned towards 0.65 acceptance: a broken adaptation shows here.
    assert 0.5 < result.acceptance.mean() < 0.9 and (result.step_size > 0.01).all()


def test_ais_with_encoder_and_few_steps_stays_a_lower_bound(flat_run):
    # Three distributions, many chains: each weight is unbiased for p(x), so the estimate sits
    # below log p(x) by Jensen's gap only, never above it beyond noise.
    _, model, x, exact = flat_run
    result = ais(model, x, steps=3, chains=256)
    error = result.log_likelihood - exact
    se = standard_errors(result.log_weights)
    assert error.mean() < 3 * se.square().sum().sqrt() / len(x), (error, se)  # measured: -0.77 < 0.47
    # Not vacuously low: half the images within 0.2 nats (the encoder's heavy tail costs one image 5.6).
    assert error.median() > -0.5, error


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("start", ["prior", "encoder"])
def test_one_distribution_is_importance_sampling_with_k_chains(layers, start):
    # steps=1: w = f_1(h)/f_0(h) with h ~ f_0, i.e. IS from the prior (w = p(x|h)) or from the
    # encoder (w = p(x, h)/q(h|x)) with k = chains. Same distribution of estimates as an
    # independent computation: each image repeated 400 times, each copy with its own noise.
    torch.manual_seed(0)
    model = build_model(layers, latent_dims=[2] * layers, hidden_dims=[16] * layers, x_dim=20)
    with torch.no_grad():
        model.decoder.out.weight *= 4  # p(x|h) that varies with h, so that a wrong h shows
        if layers == 2:  # p(h1|h2) far from N(0, I): mean (2, -2), sigma 0.37
            model.priors[0].head.bias.copy_(torch.tensor([2.0, -2.0, -1.0, -1.0]))
    images, copies, chains = random_binary(3, 20, seed=1), 400, 8
    x = images.repeat_interleave(copies, dim=0)
    estimate = ais_log_likelihood(model, x, steps=1, chains=chains, start=start).view(3, copies)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        if start == "encoder":
            log_w = model.log_weights(x, chains, generator)
        else:
            h = torch.randn((chains, len(x), 2), generator=generator)
            if layers == 2:
                mean, log_std = model.priors[0](h)
                h = mean + log_std.exp() * torch.randn(h.shape, generator=generator)
            log_w = model.decoder.log_prob(x, h)
    independent = (torch.logsumexp(log_w.double(), 0) - math.log(chains)).view(3, copies)
    z = (estimate.mean(1) - independent.mean(1)) / (estimate.var(1) / copies + independent.var(1) / copies).sqrt()
    assert z.abs().max() < 4, z
    ratio = estimate.std(1) / independent.std(1)  # measured 0.81 to 1.05: SDs of skewed draws
    assert ((ratio > 2 / 3) & (ratio < 3 / 2)).all(), ratio


@pytest.mark.parametrize("layers", [1, 2])
def test_ais_matches_quadrature_on_tiny_models(layers):
    # The 2-layer path (p(h2) p(h1|h2), q(h1|x) q(h2|h1), both layers in one HMC state) against
    # test_objectives' exact integral, on random models with scalar latents per layer.
    torch.manual_seed(3)
    if layers == 1:
        model, exact_fn = build_model(1, latent_dims=[2], hidden_dims=[16], x_dim=12), exact_log_px_one_layer
    else:
        model, exact_fn = build_model(2, latent_dims=[1, 1], hidden_dims=[16, 8], x_dim=12), exact_log_px_two_layers
    model = model.double()
    x = random_binary(10, 12, seed=5).double()
    result = ais(model, x, steps=30, chains=64)
    error = result.log_likelihood - exact_fn(model, x)
    se = standard_errors(result.log_weights)
    assert (error.abs() < 4 * se + 0.01).all(), (error, se)
    assert error.mean().abs() < 4 * se.square().sum().sqrt() / len(x), (error, se)


def test_bdmc_sandwich_holds_and_closes_as_steps_grow(few_pass_model):
    model, _ = few_pass_model
    short, long = bdmc(model, 8, steps=5, chains=8), bdmc(model, 8, steps=50, chains=8)
    assert torch.equal(short.x, long.x) and set(short.x.unique().tolist()) <= {0.0, 1.0}
    assert short.x.shape == (8, 784) and [h.shape for h in short.latents] == [(8, 50)]
    # Five distributions leave a wide gap on every image (measured: 7 nats or more at 10 steps).
    assert (short.upper > short.lower).all(), short.gap
    gap, gap_se = long.gap.mean(), long.gap.std() / math.sqrt(8)
    assert gap > -3 * gap_se, long.gap  # lower <= upper, up to noise
    assert gap < short.gap.mean() / 5, (long.gap, short.gap)
    assert torch.allclose(long.lower, long.forward.log_likelihood)


def test_ais_finds_more_than_is_at_k5000_on_a_few_pass_model(few_pass_model):
    model, x = few_pass_model
    # IS at k=5000 underestimates log p(x); AIS + encoder with 60 distributions already finds more
    # (measured: +0.51 ± 0.12 nats over these 32 images; IS's own noise dominates the spread).
    difference = ais_log_likelihood(model, x, steps=60, chains=16) - log_likelihood(model, x, k=5000)
    se = difference.std() / math.sqrt(len(x))
    print(f"AIS - IS(k=5000), {len(x)} images: {difference.mean():+.3f} ± {se:.3f} nats")
    assert difference.mean() > 0, difference


@pytest.mark.parametrize("layers", [1, 2])
def test_deterministic_and_independent_of_batch_neighbours(layers):
    # In float64, so that batch shapes cannot flip a Metropolis decision through float32 rounding
    # (a log-weight of ~500 nats carries rounding of ~1e-4, and one flipped decision moves an
    # estimate by far more): estimates then agree to float64 rounding, while noise or step sizes
    # shared across images would move them by nats.
    torch.manual_seed(4)
    model = build_model(layers, latent_dims=[4] * layers, hidden_dims=[32] * layers, x_dim=50).double()
    x = random_binary(5, 50, seed=6).double()
    whole = ais(model, x, steps=12, chains=4, image_batch=5)
    assert torch.equal(whole.log_likelihood, ais(model, x, steps=12, chains=4, image_batch=5).log_likelihood)
    pairs = ais(model, x, steps=12, chains=4, image_batch=2)
    assert torch.allclose(pairs.log_weights, whole.log_weights, rtol=1e-10, atol=0)
    other = x.clone()
    other[[0, 2]] = random_binary(2, 50, seed=7).double()
    neighbours = ais(model, other, steps=12, chains=4, image_batch=5).log_likelihood
    assert torch.allclose(neighbours[[1, 3, 4]], whole.log_likelihood[[1, 3, 4]], rtol=1e-10, atol=0)
    assert not torch.allclose(neighbours[[0, 2]], whole.log_likelihood[[0, 2]])
    seeded = ais(model, x, steps=12, chains=4, generator=torch.Generator().manual_seed(1)).log_likelihood
    again = ais(model, x, steps=12, chains=4, generator=torch.Generator().manual_seed(1)).log_likelihood
    assert torch.equal(seeded, again) and not torch.allclose(seeded, whole.log_likelihood)
    assert all(p.grad is None for p in model.parameters())


def test_bad_settings_are_named():
    model = build_model(1)
    x = random_binary(2, 784)
    for options, message in [
        (dict(steps=0), "steps=0"),
        (dict(steps=5, chains=0), "chains=0"),
        (dict(steps=5, start="posterior"), "start='posterior'"),
    ]:
        with pytest.raises(ValueError, match=message):
            ais(model, x, **options)
    with pytest.raises(ValueError, match="images=0"):
        bdmc(model, 0, steps=5)


def run_cli(*args, env_dir):
    threads = {name: os.environ[name] for name in ["OMP_NUM_THREADS"] if name in os.environ}
    return subprocess.run(
        [sys.executable, "-m", "iwae_model.evaluate", *map(str, args)],
        capture_output=True,
        text=True,
        env={"IWAE_DATA_DIR": str(env_dir), "PATH": "", **threads},
    )


def test_cli_ais_and_bdmc_json(flat_run, mnist, mnist_dir):
    run_dir, model, _, _ = flat_run
    out = run_cli(
        run_dir,
        *("--k", 200, "--images", 8, "--ais", 5, "--ais-images", 6, "--ais-chains", 4),
        *("--bdmc", 5, "--bdmc-images", 4, "--json", "--device", "cpu"),
        env_dir=mnist_dir,
    )
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    figures, sandwich = row["ais"], row["bdmc"]
    assert (figures["steps"], figures["chains"], figures["images"], figures["start"]) == (5, 4, 6, "encoder")
    # IS on the same first 6 test images as AIS, at the CLI's --k: as computed here.
    is_ll = log_likelihood(model, mnist.binarized_once("test")[:6], k=200)
    assert figures["is_nll"] == pytest.approx(-is_ll.mean().item(), rel=1e-6)
    assert figures["ais_minus_is"] == pytest.approx(figures["is_nll"] - figures["nll"], rel=1e-6, abs=1e-9)
    assert figures["nll_se"] > 0 and figures["ais_minus_is_se"] > 0 and 0 < figures["acceptance"] <= 1
    assert (sandwich["steps"], sandwich["images"], sandwich["chains"]) == (5, 4, 4)
    assert sandwich["gap"] == pytest.approx(sandwich["upper"] - sandwich["lower"], rel=1e-6, abs=1e-9)
    assert sandwich["lower"] < 0 and sandwich["gap_se"] > 0


def test_cli_text(flat_run, mnist_dir, capsys):
    run_dir = flat_run[0]
    main(
        [
            str(run_dir),
            "--data-dir",
            str(mnist_dir),
            "--k",
            "50",
            "--images",
            "4",
            "--ais",
            "5",
            "--ais-chains",
            "2",
            "--bdmc",
            "5",
        ]
    )
    text = capsys.readouterr().out
    assert "AIS (5 distributions, 2 chains, encoder start) on the first 4 test images: NLL" in text
    assert "IS (k=50) on the same images" in text and "AIS - IS in log p(x):" in text
    assert "BDMC (5 distributions, 2 chains, encoder start) on 100 images simulated from the model" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ais", "0"], "--ais 0: must be at least 1"),
        (["--ais", "5", "--ais-chains", "0"], "--ais-chains 0: must be at least 1"),
        (["--ais", "5", "--ais-images", "0"], "--ais-images 0: must be at least 1"),
        (["--bdmc", "-3"], "--bdmc -3: must be at least 1"),
        (["--bdmc", "5", "--bdmc-images", "0"], "--bdmc-images 0: must be at least 1"),
        (["--ais-images", "5"], "--ais-images 5: only used with --ais STEPS"),
        (["--bdmc-images", "5"], "--bdmc-images 5: only used with --bdmc STEPS"),
        (["--ais", "5", "--ais-images", "10001"], "--ais-images 10001: the test set has 10000 images"),
        (["--ais", "5", "--images", "4", "--ais-images", "5"], "--ais-images 5: more than the 4 test images"),
    ],
)
def test_cli_refuses_bad_settings_before_running(flat_run, mnist_dir, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main([str(flat_run[0]), "--data-dir", str(mnist_dir), *args])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and message in captured.err and "Traceback" not in captured.err
    assert captured.out == ""  # nothing ran
