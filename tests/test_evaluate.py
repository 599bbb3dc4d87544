import json
import subprocess
import sys

import pytest
import torch
from conftest import FLOAT32_REORDER_RTOL, random_binary, small_mnist

from iwae_model import TrainConfig, build_model
from iwae_model.evaluation import evaluate_model
from iwae_model.likelihood import active_units, bound, evaluation_noise, log_likelihood
from iwae_model.objectives import build_objective
from iwae_model.training import train


@pytest.mark.parametrize("layers", [1, 2])
def test_chunking_changes_nothing_but_memory_and_float32_rounding(layers):
    torch.manual_seed(0)
    model = build_model(layers)
    x = random_binary(5, 784)
    whole = log_likelihood(model, x, k=300, image_batch=5, chunk_rows=300 * 5)
    for chunk_rows in [5, 7, 64, 1000]:  # 1 sample per chunk up to uneven multi-sample chunks
        chunked = log_likelihood(model, x, k=300, image_batch=5, chunk_rows=chunk_rows)
        # A chunk bug (a sample skipped or counted twice, a wrong log k) moves the estimate by nats.
        assert torch.allclose(chunked, whole, rtol=FLOAT32_REORDER_RTOL, atol=0)
    assert whole.dtype == torch.float64 and whole.shape == (5,)


def test_chunked_estimate_equals_a_direct_logsumexp_over_the_same_samples():
    torch.manual_seed(1)
    model = build_model(1)
    x = random_binary(4, 784)
    k = 500
    noise = evaluation_noise(model, k, 0, 4)
    with torch.no_grad():
        direct = torch.logsumexp(model.log_weights(x, noise=noise).double(), dim=0) - torch.log(
            torch.tensor(float(k), dtype=torch.float64)
        )
    chunked = log_likelihood(model, x, k=k, image_batch=4, chunk_rows=40)
    assert torch.allclose(chunked, direct, rtol=FLOAT32_REORDER_RTOL, atol=0)


def test_log_likelihood_is_seeded_and_above_the_iwae_bound():
    torch.manual_seed(2)
    model = build_model(1)
    x = random_binary(8, 784)
    first, again = log_likelihood(model, x, k=2000), log_likelihood(model, x, k=2000)
    assert torch.equal(first, again)
    iwae5 = bound(model, x, build_objective("iwae", k=5))
    elbo = bound(model, x, build_objective("vae", k=1))
    # Tighter bound, higher value: per image the gaps are tens of nats on an untrained model.
    assert (first > iwae5).all() and iwae5.mean() > elbo.mean()


def test_active_units_counts_units_whose_posterior_mean_varies():
    torch.manual_seed(3)
    model = build_model(2)
    x = random_binary(200, 784)
    with torch.no_grad():
        # Zero the mean head's weights for 30 of the 100 first-layer units: their mean is the
        # bias alone, constant across images, so they are inactive; the rest vary.
        model.encoders[0].head.weight[:30] = 0
        model.encoders[0].head.weight[30:100] *= 20
    units = active_units(model, x)
    assert units[0] == 70
    with torch.no_grad():
        model.encoders[1].head.weight[:50] = 0  # the whole second-layer mean head
    assert active_units(model, x)[1] == 0


@pytest.fixture(scope="module")
def short_run(mnist, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    data = small_mnist(mnist, train=2000, test=200)
    train(TrainConfig(k=5, passes=2, train_images=2000, test_images=200, seed=0), run_dir, data, progress=False)
    return run_dir, data


def test_evaluate_model_on_a_short_real_run(short_run):
    run_dir, data = short_run
    from iwae_model.checkpoint import load_model

    model, config, _ = load_model(run_dir)
    result = evaluate_model(model, data, config.build_objective(), k=1000, images=50)
    assert result.images == 50 and result.k == 1000 and not result.comparable_to_papers
    # After 200 steps on real MNIST a model is far from trained but far from random (~540 nats).
    assert 90 < result.nll < 250 and 0 < result.nll_se < 10
    assert result.test_bound < -result.nll and result.test_bound_name == "IWAE(K=5)"
    assert len(result.active_units) == 1 and 0 < result.active_units[0] <= 50


def run_cli(*args, env_dir):
    return subprocess.run(
        [sys.executable, "-m", "iwae_model.evaluate", *map(str, args)],
        capture_output=True,
        text=True,
        env={"IWAE_DATA_DIR": str(env_dir), "PATH": ""},
    )


def test_cli_json_and_text(short_run, mnist_dir):
    run_dir, _ = short_run
    out = run_cli(run_dir, "--k", 100, "--images", 20, "--json", "--device", "cpu", env_dir=mnist_dir)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["k"] == 100 and row["images"] == 20 and row["nll"] > 0
    assert row["config"]["k"] == 5 and row["comparable_to_papers"] is False
    assert 1 <= row["ess_median"] <= 100 and 1 <= row["ess_mean"] <= 100 and 0 <= row["pareto_k_above"] <= 1
    assert "per_image" not in row and row["noise"].startswith("seed 123, k 100, latents 50")
    text = run_cli(run_dir, "--k", 100, "--images", 20, "--device", "cpu", env_dir=mnist_dir)
    assert text.returncode == 0, text.stderr
    assert "test NLL" in text.stdout and "not comparable to the papers" in text.stdout
    assert f"ESS mean {row['ess_mean']:.1f}, median {row['ess_median']:.1f} of k=100" in text.stdout
    assert f"Pareto k̂ > 0.7 (estimate unreliable) for {row['pareto_k_above']:.1%} of images" in text.stdout


def test_cli_errors_name_the_problem(tmp_path, mnist_dir):
    missing = run_cli(tmp_path / "nowhere", env_dir=mnist_dir)
    assert missing.returncode != 0 and "nowhere" in missing.stderr
    bad_k = run_cli(tmp_path, "--k", 0, env_dir=mnist_dir)
    assert bad_k.returncode == 2 and "--k 0" in bad_k.stderr
