"""The CUDA path of `iwae_model`, on a GPU host: run it there with

    python -m pytest -m cuda && python -m iwae_model.bench --device cuda

These checks import only `iwae_model` (pure PyTorch), so they run on a GPU host with the site's
torch and no Ray (docs/gpu.md); a sweep's trial on a GPU is in test_cuda_sweep.py. Everywhere else
every test here is skipped with one line saying why. What the CPU suite checks of the same path
(the device decision, a GPU's checkpoint resumed on a CPU, batch- and chunk-independent noise) is
in test_devices.py."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from conftest import Crash, crash_after_first_pass, random_binary, small_mnist

from iwae_model import TrainConfig, build_model
from iwae_model.checkpoint import load_checkpoint
from iwae_model.data import Dataset
from iwae_model.likelihood import burda_active_units, importance_sampling
from iwae_model.training import build_surrogate, train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch here"),
]

CUDA = torch.device("cuda")
TINY = dict(train_images=200, test_images=100, passes=3, k=5, seed=3)
# CPU and GPU evaluate exp, log1p and the GEMMs with other kernels, each within a few float32
# ulps: 1e-5 relative is 84 ulps, 0.006 nats at log p(x) = -600, where a wrong sample or noise
# stream would move an estimate by nats.
CROSS_DEVICE_RTOL = 1e-5


@pytest.fixture(scope="module")
def data(mnist):
    return small_mnist(mnist)


def on(data: Dataset, device: torch.device) -> Dataset:
    return dataclasses.replace(
        data,
        **{name: getattr(data, name).to(device) for name in ("train", "valid", "test", "train_labels", "test_labels")},
    )


def stop_and_resume(
    config: TrainConfig, run_dir, first: Dataset, then: Dataset, first_device, then_device
) -> list[dict]:
    with pytest.raises(Crash):
        train(config, run_dir, first, device=first_device, progress=False, on_epoch_end=crash_after_first_pass)
    return train(config, run_dir, then, device=then_device, progress=False)


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir)["model"]


@pytest.mark.parametrize("compile", [False, True])
def test_a_resumed_run_is_bit_identical_on_cuda(data, tmp_path, compile):
    config, gpu = TrainConfig(**TINY, compile=compile), on(data, CUDA)
    straight = train(config, tmp_path / "straight", gpu, device=CUDA, progress=False)
    resumed = stop_and_resume(config, tmp_path / "resumed", gpu, gpu, CUDA, CUDA)
    assert [r["train_bound"] for r in resumed] == [r["train_bound"] for r in straight]
    assert not any(r["generator_reseeded"] for r in resumed)
    for name, tensor in weights(tmp_path / "straight").items():
        assert torch.equal(tensor, weights(tmp_path / "resumed")[name]), name


@pytest.mark.parametrize("first, then", [("cpu", "cuda"), ("cuda", "cpu")])
def test_a_run_continues_on_the_other_device_type(data, tmp_path, capfd, first, then):
    devices = {"cpu": torch.device("cpu"), "cuda": CUDA}
    history = stop_and_resume(
        TrainConfig(**TINY), tmp_path, on(data, devices[first]), on(data, devices[then]), devices[first], devices[then]
    )
    assert [r["generator_reseeded"] for r in history] == [False, True, False]
    assert f"resumed on {then} from a checkpoint written on {first}" in capfd.readouterr().err
    assert history[-1]["train_bound"] > history[0]["train_bound"]  # it trained on from where it stopped
    assert load_checkpoint(tmp_path)["rng"]["device"] == then


@pytest.mark.parametrize("layers", [1, 2])
def test_cuda_and_cpu_estimate_the_same_per_image(data, layers):
    torch.manual_seed(0)
    model = build_model(layers).eval()
    x = random_binary(150, 784)  # a partial batch on both
    cpu = importance_sampling(model, x, 1000)
    gpu = importance_sampling(model.to(CUDA), x.to(CUDA), 1000)
    assert torch.allclose(cpu.log_likelihood, gpu.log_likelihood.cpu(), rtol=CROSS_DEVICE_RTOL, atol=0)
    assert torch.allclose(cpu.ess, gpu.ess.cpu(), rtol=1e-3)
    # Active units: the same binarization and the same posterior noise, drawn on the CPU.
    assert burda_active_units(model.cpu(), data) == burda_active_units(model.to(CUDA), on(data, CUDA))


def test_compiled_and_eager_surrogates_agree(data):
    config = TrainConfig(**TINY)
    torch.manual_seed(0)
    model = config.build_model().to(CUDA)
    objective, estimator = config.build_objective(), config.build_estimator()
    x = random_binary(20, 784).to(CUDA)
    noise = model.draw_noise(objective.num_samples, 20, torch.Generator(device=CUDA).manual_seed(0))
    params = model.encoder_parameters(), model.decoder_parameters()
    grads = []
    for compile in (False, True):  # the backward pass too: it is what training and its resume rely on
        model.zero_grad(set_to_none=True)
        losses = build_surrogate(model, objective, estimator, compile=compile)(x, noise)
        losses.backward(*params)
        grads.append((losses.decoder_loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = grads
    assert torch.allclose(eager_loss, compiled_loss, rtol=CROSS_DEVICE_RTOL)
    # Sums over the batch in another order: off by about 1e-5 of the gradient's scale (measured on
    # a CPU); a wrong backward graph is off by its whole scale.
    for eager, compiled in zip(eager_grads, compiled_grads):
        assert (eager - compiled).abs().max() <= 1e-4 * eager.abs().max()


def test_the_benchmark_s_cuda_figures():
    out = subprocess.run(
        [sys.executable, "-m", "iwae_model.bench", "--quick", "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    figures = [json.loads(line) for line in out.stdout.splitlines()]
    assert {f["figure"] for f in figures} == {
        "matmul_peak",
        "train",
        "vs_bare_loop",
        "evaluate",
        "is_diagnostics_overhead",
        "ais",
    }
    assert all(f["device"] == "cuda" for f in figures if f["figure"] == "matmul_peak")
    assert all(f["images_per_s"] > 0 for f in figures if f["figure"] in ("train", "evaluate", "ais"))
