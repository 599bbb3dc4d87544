import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import Crash, crash_after_first_pass, small_mnist

from iwae_model import TrainConfig
from iwae_model.checkpoint import load_checkpoint
from iwae_model.config import settings
from iwae_model.train import parse_args
from iwae_model.training import InitError, NonFiniteLoss, stage_boundaries, stage_lr, train

TINY = dict(train_images=200, test_images=100, passes=3, k=5, seed=3)
METRIC_FIELDS = {
    "epoch",
    "step",
    "stage",
    "lr",
    "train_bound",
    "valid_bound",
    "valid_ll",
    "test_bound",
    "test_nll",
    "active_units",
    "train_seconds",
    "images_per_s",
    "snr",
    "generator_reseeded",
}
TIMING_FIELDS = {"train_seconds", "images_per_s"}


def test_full_schedule_is_burdas():
    cumulative_passes = [1, 4, 13, 40, 121, 364, 1093]
    for schedule in ("compressed", "truncated"):
        assert stage_boundaries(2980, 3280, schedule) == [p * 2980 for p in cumulative_passes]
    code_lrs = [1e-3, 7.2e-4, 5.2e-4, 3.7e-4, 2.7e-4, 1.9e-4, 1.4e-4, 1e-4]  # the authors' rounded values
    assert [stage_lr(1e-3, i) for i in range(8)] == pytest.approx(code_lrs, rel=0.02)
    assert stage_lr(1e-3, 7) == pytest.approx(1e-4)


def test_compressed_schedule_keeps_each_stages_share():
    boundaries = stage_boundaries(1000, 3, "compressed")  # 3,000 steps
    assert boundaries == [round(3000 * p / 3280) for p in [1, 4, 13, 40, 121, 364, 1093]]
    assert stage_boundaries(1000, 3, "truncated")[:2] == [1000, 4000]


def strip_timing(history):
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in history]


@pytest.fixture(scope="module")
def tiny_data(mnist):
    return small_mnist(mnist)


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    history = train(TrainConfig(**TINY), run_dir, tiny_data, progress=False)
    return run_dir, history


def assert_same_run(run_a: Path, run_b: Path):
    a, b = load_checkpoint(run_a), load_checkpoint(run_b)
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][index]["exp_avg_sq"])
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"])
    assert strip_timing(a["history"]) == strip_timing(b["history"])


def test_metrics_jsonl_has_the_documented_fields(uninterrupted):
    run_dir, history = uninterrupted
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and strip_timing(rows) == strip_timing(history)
    assert all(set(row) == METRIC_FIELDS for row in rows)
    assert [row["epoch"] for row in rows] == [1, 2, 3] and rows[-1]["step"] == 30
    assert all(row["test_bound"] < 0 and row["valid_bound"] < 0 for row in rows)
    assert rows[-1]["stage"] == 7 and rows[-1]["lr"] == pytest.approx(1e-4)


def test_a_run_stopped_and_resumed_ends_bit_identical(tiny_data, uninterrupted, tmp_path):
    with pytest.raises(Crash):
        train(TrainConfig(**TINY), tmp_path, tiny_data, progress=False, on_epoch_end=crash_after_first_pass)
    assert load_checkpoint(tmp_path)["epoch"] == 1
    train(TrainConfig(**TINY), tmp_path, tiny_data, progress=False)
    assert_same_run(uninterrupted[0], tmp_path)


def test_a_process_killed_with_sigkill_resumes_bit_identical(mnist_dir, tiny_data, uninterrupted, tmp_path):
    # A real hard kill: the training process SIGKILLs itself right after its first checkpoint,
    # with no chance to clean up; then the run resumes here.
    script = f"""
import os, signal
from iwae_model import TrainConfig, load_mnist
from iwae_model.training import train
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import small_mnist
data = small_mnist(load_mnist({str(mnist_dir)!r}, download=False))
train(TrainConfig(**{TINY!r}), {str(tmp_path)!r}, data, progress=False,
      on_epoch_end=lambda run: os.kill(os.getpid(), signal.SIGKILL))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    train(TrainConfig(**TINY), tmp_path, tiny_data, progress=False)
    assert_same_run(uninterrupted[0], tmp_path)


def test_same_seed_same_numbers_other_seed_other_numbers(tiny_data, uninterrupted, tmp_path):
    again = train(TrainConfig(**TINY), tmp_path / "again", tiny_data, progress=False)
    assert strip_timing(again) == strip_timing(uninterrupted[1])
    other = train(TrainConfig(**{**TINY, "seed": 4}), tmp_path / "other", tiny_data, progress=False)
    assert other[-1]["train_bound"] != uninterrupted[1][-1]["train_bound"]


def test_a_different_configuration_in_the_same_run_dir_is_refused(tiny_data, uninterrupted):
    with pytest.raises(ValueError, match=r"differs in \['k'\]"):
        train(TrainConfig(**{**TINY, "k": 7}), uninterrupted[0], tiny_data, progress=False)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tiny_data, tmp_path):
    # A learning rate of 1e4 sends log sigma to overflow within a pass.
    config = TrainConfig(**{**TINY, "lr": 1e4})
    with pytest.raises(NonFiniteLoss, match=r"became (nan|inf|-inf) in pass 1 .*lower --lr"):
        train(config, tmp_path, tiny_data, progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    "objective, extra",
    [
        ("vae", {}),
        ("miwae", {"m": 2}),
        ("ciwae", {"beta": 0.3}),
        ("piwae", {"m": 2}),
    ],
)
def test_every_objective_trains_and_improves(tiny_data, tmp_path, objective, extra):
    config = TrainConfig(**{**TINY, "objective": objective, "k": 3, "passes": 4, "schedule": "truncated", **extra})
    history = train(config, tmp_path, tiny_data, progress=False)
    assert history[-1]["train_bound"] > history[0]["train_bound"] + 5


@pytest.mark.parametrize("layers, estimator", [(1, "dreg"), (2, "stl"), (2, "reparam")])
def test_estimators_and_two_layers_train(tiny_data, tmp_path, layers, estimator):
    config = TrainConfig(**{**TINY, "layers": layers, "estimator": estimator, "passes": 4, "schedule": "truncated"})
    history = train(config, tmp_path, tiny_data, progress=False)
    assert history[-1]["train_bound"] > history[0]["train_bound"] + 5
    assert len(history[-1]["active_units"]) == layers


def run_cli(*args, env_data=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--k", "0"], "k=0: must be a positive integer"),
        (["--layers", "2", "--estimator", "dreg"], "estimator='dreg' with layers=2"),
        (["--objective", "ciwae", "--beta", "2"], "beta=2.0"),
    ],
)
def test_train_cli_rejects_bad_settings_by_name(tmp_path, args, message):
    result = run_cli("iwae_model.train", "--out", str(tmp_path), *args)
    assert result.returncode == 2 and message in result.stderr


def test_train_cli_runs_on_real_mnist_and_prints_the_last_row(mnist_dir, tmp_path):
    result = run_cli(
        "iwae_model.train",
        "--out",
        str(tmp_path / "run"),
        "--data-dir",
        str(mnist_dir),
        "--train-images",
        "400",
        "--test-images",
        "20",
        "--passes",
        "2",
        "--no-progress",
        "--nll-every",
        "2",
        "--nll-k",
        "100",
        "--nll-images",
        "20",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["epoch"] == 2 and last["label"] == "iwae_L1_M1_K5_s0"
    assert 0 < last["test_nll"] < -last["test_bound"] + 1  # the NLL estimate beats the bound's value


@pytest.mark.parametrize("changes", [{}, {"objective": "piwae", "m": 2, "k": 2, "estimator": "dreg"}])
def test_compiled_training_computes_the_same_run(tiny_data, tmp_path, changes):
    # PIWAE with DReG: two surrogate losses, two backward passes through one compiled graph.
    config = {**TINY, "passes": 2, **changes}
    eager = train(TrainConfig(**config), tmp_path / "eager", tiny_data, progress=False)
    compiled = train(TrainConfig(**config, compile=True), tmp_path / "compiled", tiny_data, progress=False)
    for a, b in zip(eager, compiled, strict=True):
        # Same draws, same maths; fused kernels round differently in the last bits.
        assert b["train_bound"] == pytest.approx(a["train_bound"], rel=1e-4)
        assert b["valid_bound"] == pytest.approx(a["valid_bound"], rel=1e-4)


def optimizer_steps(state: dict) -> set[float]:
    return {float(s["step"]) for s in state["optimizer"]["state"].values()}


def test_a_continued_run_starts_from_its_parents_weights_with_a_fresh_optimizer(tiny_data, uninterrupted, tmp_path):
    parent_dir = uninterrupted[0]
    parent = load_checkpoint(parent_dir)
    # lr 1e-12: one pass moves no weight by more than ~1e-10, so the start is visible at the end.
    child = dict(
        TINY,
        objective="vae",
        k=1,
        passes=1,
        lr=1e-12,
        schedule="constant",
        init_from=str(parent_dir),
        init_label="iwae_L1_M1_K5_s3",
    )
    history = train(TrainConfig(**child), tmp_path / "fresh_adam", tiny_data, progress=False)
    state = load_checkpoint(tmp_path / "fresh_adam")
    for name, value in parent["model"].items():
        assert torch.allclose(state["model"][name], value, rtol=0, atol=1e-9), name
    assert optimizer_steps(state) == {10.0} and history[0]["lr"] == 1e-12  # Adam from step 0; lr held constant
    train(TrainConfig(**child, init_optimizer=True), tmp_path / "kept_adam", tiny_data, progress=False)
    assert optimizer_steps(load_checkpoint(tmp_path / "kept_adam")) == {40.0}  # the parent's 30 steps, then 10
    assert TrainConfig(**child).label() == "vae_L1_M1_K1_s3_from_iwae_L1_M1_K5_s3"


def test_a_continued_run_resumes_bit_identical_without_reloading_its_parent(tiny_data, uninterrupted, tmp_path):
    parent = tmp_path / "parent"
    shutil.copytree(uninterrupted[0], parent)
    child = TrainConfig(**dict(TINY, objective="vae", k=1, lr=1e-4, schedule="constant", init_from=str(parent)))
    train(child, tmp_path / "straight", tiny_data, progress=False)
    with pytest.raises(Crash):
        train(child, tmp_path / "resumed", tiny_data, progress=False, on_epoch_end=crash_after_first_pass)
    shutil.rmtree(parent)  # never read again: the resume starts from the child's own checkpoint
    train(child, tmp_path / "resumed", tiny_data, progress=False)
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_init_from_refuses_another_architecture_and_a_missing_parent(tiny_data, uninterrupted, tmp_path, mnist_dir):
    with pytest.raises(
        InitError, match=r"\(iwae_L1_M1_K5_s3: latent sizes \[50\].*than this run.s \(latent sizes \[100, 50\]"
    ):
        train(TrainConfig(**dict(TINY, layers=2, init_from=str(uninterrupted[0]))), tmp_path, tiny_data, progress=False)
    with pytest.raises(InitError, match="continues vae_L1_M1_K1_s0, but no checkpoint of it is given"):
        train(TrainConfig(**TINY, init_label="vae_L1_M1_K1_s0"), tmp_path / "orphan", tiny_data, progress=False)
    with pytest.raises(ValueError, match="init_optimizer continues the Adam state of init_from's run: it needs"):
        TrainConfig(init_optimizer=True)
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "iwae_model.train",
            "--out",
            str(tmp_path / "x"),
            "--init-from",
            str(tmp_path / "nowhere"),
            "--data-dir",
            str(mnist_dir),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and "nowhere" in cli.stderr and "no checkpoint there" in cli.stderr
    assert "Traceback" not in cli.stderr


def test_the_train_cli_has_a_flag_for_every_setting(tmp_path):
    # Made from TrainConfig's fields, so the two cannot drift apart.
    config, _ = parse_args(
        [
            "--out",
            str(tmp_path),
            "--adam-beta2",
            "0.99",
            "--latent-dims",
            "20",
            "--hidden-dims",
            "64",
            "--compile",
            "--train-images",
            "400",
        ]
    )
    assert (config.adam_beta2, config.latent_dims, config.hidden_dims, config.compile) == (0.99, (20,), (64,), True)
    assert config.train_images == 400 and config == TrainConfig(
        adam_beta2=0.99, latent_dims=(20,), hidden_dims=(64,), compile=True, train_images=400
    )
    text = run_cli("iwae_model.train", "--help").stdout
    for setting in settings():  # the objectives' parameters too (--beta, --alpha)
        if setting.name != "init_label":  # read from the --init-from run
            assert f"--{setting.name.replace('_', '-')}" in text, setting.name
