"""Checkpoints are untrusted files: they load without unpickling code, and every bad one gets
CheckpointError naming the file and the field, never a traceback."""

import copy
import io
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import small_mnist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iwae_model import TrainConfig
from iwae_model.checkpoint import CheckpointError, load_checkpoint, load_model, restore
from iwae_model.training import build_optimizer, train

# Small layers keep each generated example's save and load to milliseconds.
SMALL = dict(train_images=200, test_images=100, passes=2, k=2, latent_dims=(4,), hidden_dims=(16,))


@pytest.fixture(scope="module")
def run_dir(mnist, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    train(TrainConfig(**SMALL), folder, small_mnist(mnist), progress=False)
    return folder


@pytest.fixture(scope="module")
def good_state(run_dir):
    return load_checkpoint(run_dir)


def load_everything(path):
    """What resuming a run does: the checked state, then model, optimizer and RNG states."""
    state = load_checkpoint(path)
    config = TrainConfig.from_dict(state["config"])
    model = config.build_model()
    restore(state, path, model, build_optimizer(model, config), torch.Generator())


def assert_refused(path, *words):
    with pytest.raises(CheckpointError) as error:
        load_everything(path)
    message = str(error.value)
    assert str(path) in message and all(word in message for word in words), message
    return message


def test_a_real_checkpoint_loads_weights_only_and_resumes(run_dir):
    load_everything(run_dir / "checkpoint.pt")
    model, config, state = load_model(run_dir)
    assert config == TrainConfig(**SMALL) and state["epoch"] == 2 and not model.training


class Payload:
    """Unpickling this creates a file: proof of code execution, harmless otherwise."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_checkpoint_carrying_code_is_refused_without_running_it(good_state, tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "checkpoint.pt"
    torch.save({**good_state, "history": [*good_state["history"][:-1], Payload(marker)]}, path)
    message = assert_refused(path, "refused", "open")
    assert "could run code" in message and not marker.exists()
    # The payload is live: plain unpickling of it (never of the file) does run it.
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def changed(state, place, value):
    state = copy.deepcopy(state)
    target = state
    for key in place[:-1]:
        target = target[key]
    if value is DELETE:
        del target[place[-1]]
    else:
        target[place[-1]] = value
    return state


DELETE = object()
BAD_FILES = {  # name: (the file from the good state and bytes, words the error must hold)
    "empty": (lambda state, raw: b"", ["empty file"]),
    "text": (lambda state, raw: b"garbage\n", ["not a torch checkpoint file"]),
    "truncated": (lambda state, raw: raw[: len(raw) // 2], ["not a readable checkpoint", "truncated"]),
    "a tensor": (lambda state, raw: torch.zeros(3), ["not an iwae-sweep checkpoint", "Tensor"]),
    "a state_dict": (lambda state, raw: state["model"], ["not an iwae-sweep checkpoint", "decoder"]),
    "old format": (lambda state, raw: changed(state, ["format"], 0), ["format 0", "version that wrote it"]),
    "newer format": (lambda state, raw: changed(state, ["format"], 3), ["format 3", "upgrade"]),
    "no config": (lambda state, raw: changed(state, ["config"], DELETE), ["'config'", "missing"]),
    "bad config": (lambda state, raw: changed(state, ["config", "k"], -3), ["'config'", "k=-3"]),
    "wrong weights": (
        lambda state, raw: changed(state, ["model", "decoder.out.bias"], torch.zeros(5)),
        ["'model'", "size mismatch"],
    ),
    "wrong rng": (
        lambda state, raw: changed(state, ["rng", "generator"], torch.zeros(3)),
        ["'rng.generator'", "uint8"],
    ),
    "short history": (lambda state, raw: changed(state, ["history"], state["history"][:1]), ["'history'", "1 rows"]),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_get_an_error_naming_file_and_field(good_state, run_dir, tmp_path, name):
    make, words = BAD_FILES[name]
    content = make(good_state, (run_dir / "checkpoint.pt").read_bytes())
    path = tmp_path / "checkpoint.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    assert_refused(path, *words)


def test_no_checkpoint_there(tmp_path):
    assert_refused(tmp_path, "no checkpoint there")


def test_the_clis_print_the_error_not_a_traceback(run_dir, tmp_path, mnist_dir):
    (tmp_path / "checkpoint.pt").write_text("garbage")
    commands = [
        ["iwae_model.evaluate", str(tmp_path), "--data-dir", str(mnist_dir), "--device", "cpu"],
        [
            "iwae_model.train",
            "--out",
            str(tmp_path),
            "--data-dir",
            str(mnist_dir),
            "--train-images",
            "200",
            "--device",
            "cpu",
        ],
    ]
    for command in commands:
        result = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and f"{tmp_path / 'checkpoint.pt'}: not a torch" in result.stderr


# ---- generated files: each loads, or raises CheckpointError naming the file -----------------


def assert_loads_or_names_the_file(path):
    try:
        load_everything(path)
    except CheckpointError as error:
        assert str(path) in str(error)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=2000))
def test_generated_byte_strings(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    assert_loads_or_names_the_file(path)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_damage_to_a_real_checkpoint(run_dir, tmp_path, data):
    raw = bytearray((run_dir / "checkpoint.pt").read_bytes())
    cut = data.draw(st.integers(0, len(raw)), label="truncate at")
    raw = raw[:cut]
    for _ in range(data.draw(st.integers(0, 8), label="bytes overwritten")):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(bytes(raw))
    assert_loads_or_names_the_file(path)


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-10, 10**6)
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
    | st.builds(torch.zeros, st.lists(st.integers(0, 4), max_size=3)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
PLACES = [
    ("format",),
    ("config",),
    ("model",),
    ("optimizer",),
    ("epoch",),
    ("step",),
    ("rng",),
    ("history",),
    ("train_seconds",),
    ("config", "k"),
    ("config", "latent_dims"),
    ("config", "objective"),
    ("config", "lr"),
    ("model", "decoder.out.weight"),
    ("optimizer", "state"),
    ("optimizer", "param_groups"),
    ("rng", "generator"),
    ("rng", "device"),
    ("history", 0),
    ("history", -1, "train_bound"),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(place=st.sampled_from(PLACES), value=values)
def test_generated_field_values(good_state, tmp_path, place, value):
    buffer = io.BytesIO()
    torch.save(changed(good_state, place, value), buffer)
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(buffer.getvalue())
    try:
        load_everything(path)
    except CheckpointError as error:
        assert str(path) in str(error)
        message = str(error)
        # Another valid config may name other layer sizes: then the weights are what do not fit.
        named = [f"'{place[0]}", "'model'"] if place[0] == "config" else [f"'{place[0]}"]
        assert any(field in message for field in [*named, "format", "refused"]), message
