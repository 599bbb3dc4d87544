"""A sweep folder from someone else runs no code of theirs: reading it (sweep.evaluate, sweep.query,
--init-from-sweep) unpickles nothing, and --resume refuses the Ray Tune state its user's driver did
not sign unless told to trust it (real Ray, real MNIST, real files)."""

import json
import os
import pickle
import shlex
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import TINY_SPACE
from pyarrow import fs as pafs

from sweep.evaluate import main as evaluate_main
from sweep.query import main as query_main
from sweep.results import read_results
from sweep.run import run_sweep
from sweep.space import parse_space
from sweep.storage import filesystem_and_path
from sweep.trust import (
    KEY_FILE_VARIABLE,
    SigningKeyError,
    UntrustedState,
    check_state_signed,
    signed_storage,
    user_key,
)

TINY = parse_space({**TINY_SPACE, "name": "tiny"}, "<tiny>")


class Touch:
    """Unpickled, it creates `marker`: what a hostile pickle in a sweep folder could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def plant_in_tuner(sweep_dir: Path, marker: Path) -> None:
    (sweep_dir / "tuner.pkl").write_bytes(pickle.dumps(Touch(marker)))


def plant_in_experiment_state(sweep_dir: Path, marker: Path) -> None:
    """A trial's field in Ray's experiment state replaced by the cloudpickled value Tune decodes on restore."""
    path = sorted(sweep_dir.glob("experiment_state-*.json"))[-1]
    state = json.loads(path.read_text())
    trial, metadata = state["trial_data"][0]
    trial = json.loads(trial)
    trial["storage"] = {"_type": "CLOUDPICKLE_FALLBACK", "value": pickle.dumps(Touch(marker)).hex()}
    state["trial_data"][0] = [json.dumps(trial), metadata]
    path.write_text(json.dumps(state))


@pytest.fixture(scope="module")
def own_key(tmp_path_factory):
    """This module's signing key, outside every sweep folder (the CLIs it runs inherit it)."""
    with pytest.MonkeyPatch.context() as patch:
        key = tmp_path_factory.mktemp("config") / "iwae-sweep" / "state.key"
        patch.setenv(KEY_FILE_VARIABLE, str(key))
        yield key


@pytest.fixture(scope="module")
def finished(own_key, local_ray, mnist_dir, tmp_path_factory):
    storage = tmp_path_factory.mktemp("storage")
    run_sweep(TINY, str(storage), str(mnist_dir))
    return storage / "tiny"


def copy_of(sweep_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "store" / sweep_dir.name
    shutil.copytree(sweep_dir, copy)
    return copy


def test_reading_a_hostile_sweep_unpickles_nothing(finished, mnist_dir, tmp_path, capsys):
    hostile, marker = copy_of(finished, tmp_path), tmp_path / "marker"
    plant_in_tuner(hostile, marker)
    plant_in_experiment_state(hostile, marker)

    evaluate_main([str(hostile), "--k", "20", "--images", "10"])
    table = read_results(str(hostile)).to_pylist()
    assert sorted(r["trial_name"] for r in table) == ["iwae_L1_M1_K3_s0", "vae_L1_M1_K1_s0"]
    assert {r["eval_k"] for r in table} == {20} and all(r["checkpoint_uri"].startswith(f"{hostile}/") for r in table)

    query_main([str(hostile)])
    assert "| layers | M | K | VAE | IWAE |" in capsys.readouterr().out

    continued = {
        **TINY_SPACE,
        "name": "continued",
        "continue": {
            "training": {"passes": 1},
            "switch": [{"from": {"objective": "vae"}, "to": {"objective": "iwae", "k": 3}}],
        },
    }
    space = replace(parse_space(continued, "<continued>"), init_from_sweep=str(hostile))
    _, rows, failed = run_sweep(space, str(tmp_path / "continued"), str(mnist_dir))
    child = next(row for row in rows if row["trial_name"].endswith("_from_vae_L1_M1_K1_s0"))
    assert not failed and len(rows) == 3 and child["parent_checkpoint_uri"].startswith(f"{hostile}/vae_L1_M1_K1_s0_")
    assert not marker.exists()


def plant_in_a_trial(sweep_dir: Path, marker: Path) -> None:
    """A trial's error.pkl, which Tune unpickles on restore, where no trial failed: unsigned."""
    (sorted(sweep_dir.glob("iwae_*"))[0] / "error.pkl").write_bytes(pickle.dumps(Touch(marker)))


PLANTS = {"tuner.pkl": plant_in_tuner, "experiment_state-": plant_in_experiment_state, "iwae_": plant_in_a_trial}


@pytest.mark.parametrize("planted", PLANTS)
def test_resume_refuses_state_its_user_did_not_sign(finished, mnist_dir, tmp_path, planted):
    hostile, marker = copy_of(finished, tmp_path), tmp_path / "marker"
    PLANTS[planted](hostile, marker)
    before = {path: path.stat().st_mtime_ns for path in hostile.rglob("*")}
    with pytest.raises(UntrustedState) as refused:
        run_sweep(TINY, str(hostile.parent), str(mnist_dir), resume=True)
    message = str(refused.value)
    why = "it has no signature" if planted == "iwae_" else "does not match its signature"
    assert message.startswith(f"{hostile}/{planted}") and why in message
    assert "--trust-folder" in message and "sweep.evaluate" in message
    assert not marker.exists()
    assert {path: path.stat().st_mtime_ns for path in hostile.rglob("*")} == before  # refused before any change


def test_trust_folder_resumes_a_sweep_signed_with_another_key(finished, mnist_dir, tmp_path, monkeypatch, capfd):
    foreign = copy_of(finished, tmp_path)
    checkpoints = sorted(foreign.glob("*/checkpoint_*"))
    monkeypatch.setenv(KEY_FILE_VARIABLE, str(tmp_path / "another user" / "state.key"))
    with pytest.raises(UntrustedState, match="signed with another key"):
        run_sweep(TINY, str(foreign.parent), str(mnist_dir), resume=True)
    _, rows, failed = run_sweep(TINY, str(foreign.parent), str(mnist_dir), resume=True, trust=True)
    assert "--trust-folder: 3 file(s) of Ray Tune's state" in capfd.readouterr().err
    assert not failed and sorted(r["trial_name"] for r in rows) == ["iwae_L1_M1_K3_s0", "vae_L1_M1_K1_s0"]
    assert sorted(foreign.glob("*/checkpoint_*")) == checkpoints  # no trial trained again
    check_state_signed(str(foreign), filesystem_and_path(str(foreign))[0])  # and what this resume saved


def test_signed_files_are_checked_as_ray_reads_them(own_key, tmp_path):
    filesystem, folder = filesystem_and_path(str(tmp_path))
    storage = signed_storage(filesystem)
    for name, data in [("error.pkl", b"first"), ("error.pkl", b"second"), ("result.json", b"{}")]:
        with storage.open_output_stream(f"{folder}/{name}") as out:
            out.write(data)
    assert not (tmp_path / "result.json.hmac").exists()  # only what Ray unpickles is signed
    with storage.open_input_file(f"{folder}/error.pkl") as stream:
        assert stream.readall() == b"second"
    (tmp_path / "error.pkl").write_bytes(b"first")  # an older version this driver wrote still counts
    with storage.open_input_stream(f"{folder}/error.pkl") as stream:
        assert stream.readall() == b"first"
    (tmp_path / "error.pkl").write_bytes(b"planted")
    with pytest.raises(UntrustedState, match=r"error\.pkl: not resumed, it does not match its signature"):
        storage.open_input_stream(f"{folder}/error.pkl")
    (tmp_path / "error.pkl.hmac").unlink()
    with pytest.raises(UntrustedState, match=r"it has no signature \(.*error\.pkl\.hmac\)"):
        storage.open_input_stream(f"{folder}/error.pkl")


def test_the_key_is_made_private_and_refused_when_it_is_not(tmp_path, monkeypatch):
    key = tmp_path / "config" / "iwae-sweep" / "state.key"
    monkeypatch.setenv(KEY_FILE_VARIABLE, str(key))
    assert user_key() == user_key() and len(user_key()) == 32
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    key.chmod(0o644)
    with pytest.raises(SigningKeyError, match=r"open to others \(mode 644\).*chmod 600"):
        user_key()
    key.chmod(0o600)
    key.write_text("not hex")
    with pytest.raises(SigningKeyError, match="damaged"):
        user_key()
    monkeypatch.setenv(KEY_FILE_VARIABLE, str(key / "under a file" / "state.key"))  # cannot be made
    with pytest.raises(SigningKeyError, match=r"cannot be made or read \(Not a directory\); point IWAE_SWEEP"):
        user_key()


def test_more_signed_files_than_arrow_has_io_threads_upload_to_s3(own_key, s3_storage, tmp_path):
    # Ray uploads a sweep with copy_files, whose copies call the signing handler on Arrow's IO
    # threads; S3's background writes then waited for a free one, and 12 failed trials' error.pkl
    # in one upload hung it for good.
    trials = [f"trial{number}" for number in range(2 * pa.io_thread_count())]
    for trial in trials:
        (tmp_path / "staging" / trial).mkdir(parents=True)
        (tmp_path / "staging" / trial / "error.pkl").write_bytes(trial.encode())
    filesystem, path = filesystem_and_path(s3_storage("sweeps"))
    filesystem.create_dir(path)
    storage = signed_storage(filesystem)
    pafs.copy_files(str(tmp_path / "staging"), f"{path}/sweep", destination_filesystem=storage)
    for trial in trials:
        with storage.open_input_stream(f"{path}/sweep/{trial}/error.pkl") as stream:
            assert stream.readall() == trial.encode()
