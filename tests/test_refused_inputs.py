"""Inputs that `python -m sweep.run` refuses before anything runs: no folder written, no data
read, no Ray started; one line naming the flag or key, the value and the fix."""

from pathlib import Path

import pytest
import ray
import yaml
from conftest import TINY_SPACE

from sweep.run import main
from sweep.space import SpaceError, parse_space


def refusal(tmp_path: Path, *flags: str, space: dict = TINY_SPACE) -> str:
    """sweep.run's message for `flags`: it must exit with it (what the CLI prints, exit status 1)
    before it reads any data (an empty --data-dir: past the checks it would stop there) or starts Ray."""
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    with pytest.raises(SystemExit) as refused:
        main(["--space", str(path), "--data-dir", str(tmp_path / "no-data"), *flags])
    assert not ray.is_initialized()
    assert isinstance(refused.value.code, str) and refused.value.code.startswith("error: "), refused.value.code
    return refused.value.code


@pytest.mark.parametrize("name", ["../../etc/x", "a/b", "..", "/tmp/x"])
def test_a_name_that_would_leave_the_storage_or_nest_is_refused(tmp_path, name):
    storage = tmp_path / "deep" / "er" / "store"
    message = refusal(tmp_path, "--name", name, "--storage", str(storage))
    assert message.startswith(f"error: --name {name!r}: must be a folder name of letters, digits")
    assert "right under --storage" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]  # nothing made, above or below


@pytest.mark.parametrize("below", ["", "sub"])
def test_a_storage_that_is_a_file_is_refused(tmp_path, below):
    file = tmp_path / "results.txt"
    file.write_text("not a folder")
    storage = file / below if below else file
    message = refusal(tmp_path, "--storage", str(storage))
    assert message == (
        f"error: --storage {storage}: {file} is a file, not a folder; give a folder (made if missing) or a URI such "
        f"as s3://bucket/sweeps"
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"experiments": [{"objective": "iwae", "k": 100000000}]},
            "experiments: iwae_L1_M1_K100000000_s0: k=100000000: a training step (batch_size 20 x M 1 x K sample "
            "rows) needs about 36,776.1 GiB of memory, over the 16.0 GiB one trial or evaluation may use "
            "(sweep.space.MEMORY_LIMIT); lower k to at most 43,506, or m or batch_size",
        ),
        (
            {"evaluation": {"k": 100000000}},
            "evaluation.k=100000000: the final evaluation on the CPU (16 images at once) needs about 596.0 GiB",
        ),
        (
            {"training": {**TINY_SPACE["training"], "valid_ll_k": 100000000}},
            "valid_ll_k=100000000: the validation likelihood estimate needs about 596.0 GiB",
        ),
        (
            {"training": {**TINY_SPACE["training"], "nll_every": 1, "nll_k": 100000000}},
            "nll_k=100000000: the test NLL estimate needs about 596.0 GiB",
        ),
        (
            {"training": {**TINY_SPACE["training"], "snr_draws": 1000000}},
            "snr_draws=1000000: the SNR's gradient draws (the parameters once per draw) needs about 1,584.3 GiB",
        ),
        (
            {"experiments": [{"objective": "iwae", "k": {"randint": [1, 1000000000]}}], "search": {"samples": 2}},
            "search: k ~ randint[1, 1000000000]: iwae_L1_M1_K999999999_s0: k=999999999",
        ),
        ({"experiments": [{"objective": "iwae", "layers": 3}]}, "iwae_L3_M1_K5_s0: layers=3: Burda's architectures"),
    ],
    ids=["k", "evaluation.k", "valid_ll_k", "nll_k", "snr_draws", "searched k", "layers"],
)
def test_a_space_that_asks_for_more_memory_than_a_trial_has_is_refused_naming_the_key(tmp_path, changes, expected):
    with pytest.raises(SpaceError) as refused:
        parse_space({**TINY_SPACE, **changes}, "space.yaml")
    assert expected in str(refused.value)
    assert expected in refusal(tmp_path, space={**TINY_SPACE, **changes})  # and the CLI says it


def test_the_memory_bound_is_per_device_and_follows_the_command_line(tmp_path):
    space = {**TINY_SPACE, "experiments": [{"objective": "iwae", "k": 5, "layers": 2}], "evaluation": {"k": 200000}}
    parse_space(space, "space.yaml")  # on the CPU, 16 images at once: 1.8 GiB
    message = refusal(tmp_path, "--eval-gpus", "1", space=space)  # on a GPU, 112 at once
    assert "evaluation.k=200000: the final evaluation on a GPU (112 images at once) needs about 25.0 GiB" in message
    assert "lower evaluation.k to at most 127,826, or evaluate on the CPU (resources.eval_gpus: 0)" in message


def test_a_20000_trial_dry_run_prints_its_plan(tmp_path, capsys):
    # It took over a minute (list membership made deduplicating the trials quadratic), printing nothing.
    space = {
        "name": "large",
        "experiments": [{"objective": "iwae", "k": 1, "lr": [(i + 1) * 1e-4 for i in range(200)]}],
        "seeds": list(range(100)),
        "training": {"passes": 1, "train_images": 100, "test_images": 20},
        "evaluation": {"k": 2, "images": 16},
    }
    path = tmp_path / "large.yaml"
    path.write_text(yaml.safe_dump(space))
    main(["--space", str(path), "--dry-run"])
    plan = capsys.readouterr().out
    assert plan.startswith(f"Sweep 'large' from {path}: 20000 trial(s).") and "Estimated wall time:" in plan
    assert plan.count("iwae_L1_M1_K1_s99 ") == 200


def test_a_resource_override_is_checked_as_the_space_file_s_key_is(tmp_path):
    message = refusal(tmp_path, "--cpus-per-trial", "0")
    assert (
        message == "error: --cpus-per-trial 0: resources.cpus_per_trial: 0.0: must be > 0 (Ray refuses an empty bundle)"
    )
    assert refusal(tmp_path, "--gpus-per-trial", "inf", "--eval-gpus", "0") == (
        "error: --gpus-per-trial inf: resources.gpus_per_trial: inf: must be a finite number"
    )
    with pytest.raises(SpaceError, match=r"^<r>: resources.gpus_per_trial: 1.5: above 1, ask for whole GPUs$"):
        parse_space({**TINY_SPACE, "name": "r", "resources": {"gpus_per_trial": 1.5}}, "<r>")
