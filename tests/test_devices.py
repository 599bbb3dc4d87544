"""The device path, as far as a CPU can check it: which device a Ray process computes on, resuming
a checkpoint written on the other device type, float32 pinned and recorded, and evaluation noise
that does not depend on the device, its batch or its chunking. tests/test_cuda.py checks the
rest on a GPU host."""

import pytest
import ray
import torch
from conftest import FLOAT32_REORDER_RTOL, TINY_SPACE, Crash, crash_after_first_pass, random_binary, small_mnist

from iwae_model import TrainConfig, build_model
from iwae_model.checkpoint import load_checkpoint
from iwae_model.device import IEEE, device_record, float32_precision, pin_float32
from iwae_model.likelihood import (
    bound,
    default_chunk_rows,
    default_image_batch,
    evaluation_noise,
    importance_sampling,
)
from iwae_model.objectives import build_objective
from iwae_model.training import build_surrogate, continuation_seed, train
from sweep.cluster import GPUUnusable, choose_device, ray_device
from sweep.evaluation import NothingToEvaluate
from sweep.run import run_sweep
from sweep.space import parse_space
from sweep.trainable import forget_earlier_trials

CUDA = torch.device("cuda")
NODE = {"hostname": "gpu-7", "node_ip": "10.0.0.7", "node_id": "abc123"}
TINY = dict(train_images=200, test_images=100, passes=3, k=2, latent_dims=(4,), hidden_dims=(16,))
CUDA_GENERATOR_STATE = torch.arange(16, dtype=torch.uint8)  # the layout of a CUDA generator's state: seed, offset


@pytest.mark.parametrize(
    "gpu_ids, cuda_usable, advertised_only, expected",
    [
        ([], False, False, "cpu"),
        ([], True, False, "cpu"),  # torch sees a GPU Ray did not give this process: not its to use
        ([], True, True, "cpu"),
        (["3"], True, False, "cuda:0"),  # Ray's CUDA_VISIBLE_DEVICES makes the assigned GPU cuda:0
        (["0"], False, True, "cpu"),  # the rehearsal's advertised GPU
        (["0", "1"], True, True, "cpu"),  # ... also where a real one is there, for which it does not stand
    ],
)
def test_the_device_follows_what_ray_assigned(gpu_ids, cuda_usable, advertised_only, expected):
    assert choose_device(gpu_ids, cuda_usable, advertised_only, NODE) == torch.device(expected)


def test_an_assigned_gpu_torch_cannot_use_fails_naming_the_node_the_build_and_the_fix():
    with pytest.raises(GPUUnusable) as error:
        choose_device(["2"], False, False, NODE)
    message = str(error.value)
    assert all(
        part in message
        for part in [
            "GPU(s) 2",
            "gpu-7",
            "10.0.0.7",
            "Ray node abc123",
            torch.__version__,
            "torch.version.cuda",
            "CUDA build",
            "nvidia-smi",
            "--gpus-per-trial 0",
        ]
    )


# On a GPU host the GPU Ray advertises is the real one, which torch can use: not this case.
needs_torch_without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="torch here can use CUDA")


@pytest.fixture(scope="module")
def ray_with_a_gpu_torch_cannot_use():
    """A local Ray that advertises one GPU on a node without the rehearsal's label: as a node whose
    torch is a CPU build, or whose driver is broken."""
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
    yield
    ray.shutdown()


@needs_torch_without_cuda
def test_in_ray_a_process_given_no_gpu_computes_on_the_cpu_and_one_given_a_gpu_fails(ray_with_a_gpu_torch_cannot_use):
    assert ray.get(ray.remote(num_gpus=0)(ray_device).remote()) == torch.device("cpu")
    with pytest.raises(ray.exceptions.RayTaskError) as raised:
        ray.get(ray.remote(num_gpus=0.5)(ray_device).remote())
    assert isinstance(raised.value.cause, GPUUnusable)
    assert f"Ray node {ray.get_runtime_context().get_node_id()}" in str(raised.value.cause)


@needs_torch_without_cuda
def test_a_trial_given_a_gpu_torch_cannot_use_fails_at_once(
    ray_with_a_gpu_torch_cannot_use, mnist_dir, tmp_path, capfd
):
    space = parse_space({**TINY_SPACE, "name": "unusable", "resources": {"gpus_per_trial": 1}}, "<unusable>")
    with pytest.raises(NothingToEvaluate):
        run_sweep(space, str(tmp_path), str(mnist_dir), max_failures=0)
    err = capfd.readouterr().err
    assert err.count("failed for good") == 2 and "cannot use CUDA" in err and "--gpus-per-trial 0" in err
    assert "pass 1/" not in err  # nothing trained


def test_float32_is_pinned_to_ieee_and_read_back():
    pin_float32()
    assert float32_precision(torch.device("cpu")) == IEEE == float32_precision(CUDA)
    assert device_record(torch.device("cpu")) == {
        "device": "cpu",
        "float32": IEEE,
        "gpu_name": None,
        "gpu_capability": None,
    }
    try:
        torch.set_float32_matmul_precision("high")  # what a torch.compile hint would do: TF32 matmuls
        assert float32_precision(CUDA) == "matmul tf32, conv ieee"
    finally:
        torch.set_float32_matmul_precision("highest")
        pin_float32()
    assert float32_precision(CUDA) == IEEE


@pytest.fixture(scope="module")
def data(mnist):
    return small_mnist(mnist)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    return train(TrainConfig(**TINY), tmp_path_factory.mktemp("straight"), data, progress=False)


def stopped_after_one_pass(data, run_dir):
    with pytest.raises(Crash):
        train(TrainConfig(**TINY), run_dir, data, progress=False, on_epoch_end=crash_after_first_pass)
    return run_dir / "checkpoint.pt"


def rewrite_rng(path, rng, checkpoint_format):
    state = torch.load(path, weights_only=True)
    torch.save({**state, "format": checkpoint_format, "rng": rng}, path)


def test_a_checkpoint_written_on_cuda_resumes_on_the_cpu_from_the_same_point(data, uninterrupted, tmp_path, capfd):
    runs = []
    for name in ("a", "b"):
        checkpoint = stopped_after_one_pass(data, tmp_path / name)
        rewrite_rng(checkpoint, {"generator": CUDA_GENERATOR_STATE, "device": "cuda"}, 2)
        runs.append(train(TrainConfig(**TINY), tmp_path / name, data, progress=False))
    err = capfd.readouterr().err
    assert err.count("resumed on cpu from a checkpoint written on cuda") == 2
    assert "from pass 2 on this run is not bit-identical" in err and "(seed 0, step 10)" in err
    first, second = runs
    assert [row["generator_reseeded"] for row in first] == [False, True, False]
    assert first[0] == uninterrupted[0] | {
        "train_seconds": first[0]["train_seconds"],
        "images_per_s": first[0]["images_per_s"],
    }
    assert first[-1]["step"] == uninterrupted[-1]["step"]  # the same position, continued to the end
    # Reseeded from (seed, step): the same resume twice is the same run; not the uninterrupted one.
    assert [row["train_bound"] for row in first] == [row["train_bound"] for row in second]
    assert first[1]["train_bound"] != uninterrupted[1]["train_bound"]
    saved = load_checkpoint(tmp_path / "a")
    assert saved["rng"]["device"] == "cpu" and set(saved["rng"]) == {"generator", "device"}


def test_the_reseeded_generator_is_a_function_of_seed_and_step():
    assert continuation_seed(0, 10) == continuation_seed(0, 10)
    assert len({continuation_seed(seed, step) for seed in (0, 1, -1) for step in (10, 11)}) == 6


def test_format_1_checkpoints_still_resume(data, uninterrupted, tmp_path, capfd):
    # Format 1 kept the global RNG states too, and a CUDA list as long as the GPUs then visible
    # (3 here, 0 visible now): ignored, as training never draws from them.
    checkpoint = stopped_after_one_pass(data, tmp_path / "cpu")
    generator = torch.load(checkpoint, weights_only=True)["rng"]["generator"]
    rewrite_rng(
        checkpoint, {"generator": generator, "torch": torch.get_rng_state(), "cuda": [CUDA_GENERATOR_STATE] * 3}, 1
    )
    history = train(TrainConfig(**TINY), tmp_path / "cpu", data, progress=False)
    strip = ("train_seconds", "images_per_s")
    assert [{k: v for k, v in row.items() if k not in strip} for row in history] == [
        {k: v for k, v in row.items() if k not in strip} for row in uninterrupted
    ]  # bit-identical
    # A format-1 checkpoint written on a GPU: its generator's device told by the state's layout.
    checkpoint = stopped_after_one_pass(data, tmp_path / "gpu")
    rewrite_rng(
        checkpoint,
        {"generator": CUDA_GENERATOR_STATE, "torch": torch.get_rng_state(), "cuda": [CUDA_GENERATOR_STATE] * 3},
        1,
    )
    assert load_checkpoint(checkpoint)["rng"]["device"] == "cuda"
    history = train(TrainConfig(**TINY), tmp_path / "gpu", data, progress=False)
    assert [row["generator_reseeded"] for row in history] == [False, True, False]
    assert "written on cuda" in capfd.readouterr().err


@pytest.mark.parametrize("layers", [1, 2])
def test_an_image_s_evaluation_noise_depends_on_the_image_and_sample_only(layers):
    model = build_model(layers)
    whole = evaluation_noise(model, 7, 0, 48)
    for start, stop in [(5, 37), (16, 32), (47, 48)]:  # across blocks, whole blocks, inside one block
        for all_of_it, part in zip(whole, evaluation_noise(model, 7, start, stop)):
            assert torch.equal(all_of_it[:, start:stop], part)
    assert [n.shape for n in whole] == [(7, 48, d) for d in model.latent_dims]


@pytest.mark.parametrize("layers", [1, 2])
def test_the_gpu_s_batch_and_chunking_give_the_cpu_s_estimates(layers):
    # The same model evaluated with the CPU's defaults (16 images, 2,048-row chunks) and a GPU's
    # (112 images, 131,072-row chunks), here on the CPU: per image the same estimate, to float32
    # rounding -- the same noise, in GEMMs of other shapes.
    torch.manual_seed(0)
    model = build_model(layers).eval()
    x, k = random_binary(40, 784), 500  # 40: a partial batch for both
    cpu = importance_sampling(model, x, k)
    gpu = importance_sampling(model, x, k, image_batch=default_image_batch(CUDA), chunk_rows=default_chunk_rows(CUDA))
    assert torch.allclose(cpu.log_likelihood, gpu.log_likelihood, rtol=FLOAT32_REORDER_RTOL, atol=0)
    assert torch.allclose(cpu.ess, gpu.ess, rtol=1e-3)  # ratios of weights; see test_importance
    assert torch.allclose(cpu.pareto_k, gpu.pareto_k, rtol=1e-3, atol=1e-3)
    objective = build_objective("iwae", k=5)
    assert torch.allclose(
        bound(model, x, objective),
        bound(model, x, objective, chunk_rows=default_chunk_rows(CUDA)),
        rtol=FLOAT32_REORDER_RTOL,
        atol=0,
    )


def test_a_reused_worker_compiles_each_trial_s_model_anew():
    """reuse_actors: without forgetting, a later trial's compile of the same surrogate code is a
    recompile, counted against dynamo's limit (8), past which dynamo runs eager without a word."""
    import torch._dynamo

    x = random_binary(4, 784)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in (1, 2):  # two trials' models, in one process
            forget_earlier_trials(torch.device("cpu"))
            config = TrainConfig(k=k, latent_dims=(2,), hidden_dims=(8,), compile=True)
            model = config.build_model()
            surrogate = build_surrogate(model, config.build_objective(), config.build_estimator(), compile=True)
            surrogate(x, model.draw_noise(config.m * config.k, 4))
