"""Objectives of a researcher's own, from a file outside the repository: loaded, refused with a
clear error when they cannot work, shipped to Ray's workers, trained and resumed by a real sweep."""

import hashlib
import json
import math
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import kill_sweep_at_first_checkpoint, small_mnist
from test_sweep import hparams_sessions

from iwae_model import TrainConfig
from iwae_model import plugins as plugin_module
from iwae_model.checkpoint import load_checkpoint
from iwae_model.data import DataError
from iwae_model.datasets import DATASETS, load_dataset
from iwae_model.objectives import OBJECTIVES
from iwae_model.plugins import PluginError, load_plugin, load_recorded, sources_of
from iwae_model.train import parse_args
from iwae_model.training import train
from sweep.plan import drawn_trials
from sweep.space import SpaceError, parse_space

TEMPERED = '''
import math
import os

import numpy as np
import torch

from iwae_model.data import DatasetSource
from iwae_model.objectives import Objective, Parameter


class Tempered(Objective):
    """tau * log 1/K sum_k w_k^(1/tau): IWAE at tau = 1."""

    name = "tempered"
    parameters = (Parameter("tau", 1.0, 0.25, 4.0, "temperature of the importance weights", "t", symbol="τ"),)
    estimators = ("reparam", "stl")

    def __init__(self, k, tau):
        self.k, self.tau = k, tau
        self.num_samples = k

    def bound(self, log_w):
        return self.tau * (torch.logsumexp(log_w / self.tau, 0) - math.log(self.k))


class Synthetic(DatasetSource):
    """Grey blobs on an 8x8 grid (the test writes its file)."""

    name = "synthetic"
    title = "Synthetic 8x8 blobs (a test plugin's dataset)"
    splits = (400, 100, 100)
    shape = (8, 8)
    files = ("synthetic.npz",)
    published = ({"paper": "nobody 2026", "objective": "iwae", "layers": 1, "m": 1, "k": 3, "nll": 30.0},)

    @classmethod
    def read(cls, folder):
        arrays = np.load(folder / "synthetic.npz")
        return arrays["train"], arrays["valid"], arrays["test"]


if "IMPORTED_FROM" in os.environ:  # where each process found this module (the sweep test reads it)
    with open(os.environ["IMPORTED_FROM"], "a") as log:
        log.write(__file__ + "\\n")
'''


@pytest.fixture
def registry(tmp_path):
    """The objectives and plugins as they were before the test: a plugin loaded here must not
    reach the other tests this worker runs (its parameter would join every TrainConfig)."""
    objectives, datasets = dict(OBJECTIVES), dict(DATASETS)
    loaded, modules = dict(plugin_module._LOADED), set(sys.modules)
    yield
    for registry, before in ((OBJECTIVES, objectives), (DATASETS, datasets)):
        registry.clear()
        registry.update(before)
    plugin_module._LOADED.clear()
    plugin_module._LOADED.update(loaded)
    for name in set(sys.modules) - modules:  # the plugins' modules: files the test wrote
        if Path(getattr(sys.modules[name], "__file__", None) or "/").is_relative_to(tmp_path):
            del sys.modules[name]


def write_plugin(folder, name, code):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(code))
    return path


BAD_PLUGINS = {  # file body: words the error must hold
    "does not import": ("import no_such_package\n", ["does not import", "No module named 'no_such_package'"]),
    "raises": ("raise RuntimeError('half-written')\n", ["does not import", "RuntimeError: half-written"]),
    "no bound": (
        "from iwae_model.objectives import Objective\nclass Nothing(Objective):\n    name = 'nothing'\n",
        ["class Nothing (name 'nothing')", "has no bound(log_w)"],
    ),
    "a built-in's name": (
        TEMPERED.replace('name = "tempered"', 'name = "iwae"'),
        ["name 'iwae'", "taken by iwae_model.objectives.IWAE"],
    ),
    "a parameter without a range": (
        TEMPERED.replace(
            'Parameter("tau", 1.0, 0.25, 4.0, "temperature of the importance weights", "t", symbol="τ")',
            'Parameter("tau", 1.0, help="temperature", label="t")',
        ),
        ["does not import", "missing 2 required positional arguments: 'low' and 'high'"],
    ),
    "an unbounded range": (
        TEMPERED.replace("0.25, 4.0,", "0.25, float('inf'),"),
        ["Parameter 'tau'", "high=inf", "finite default and range"],
    ),
    "a training setting's name": (
        TEMPERED.replace('Parameter("tau"', 'Parameter("lr"'),
        ["class Tempered (name 'tempered'): its parameter(s) ['lr'] are training settings' names; rename them"],
    ),
    "dreg without its coefficients": (
        TEMPERED.replace('estimators = ("reparam", "stl")', 'estimators = ("reparam", "dreg")'),
        ["lists dreg", "no dreg_coefficients"],
    ),
    "a dataset without read": (
        TEMPERED.replace(
            "    @classmethod\n    def read(cls, folder):", "    @classmethod\n    def reader(cls, folder):"
        ),
        ["dataset class Synthetic (name 'synthetic')", "has no read(folder)"],
    ),
    "an integer parameter with a real default": (
        TEMPERED.replace('"t", symbol="τ")', '"t", integer=True, symbol="τ")'),
        ["Parameter 'tau'", "an integer parameter needs an integer default, low and high"],
    ),
    "no objective": ("X = 1\n", ["defines no objective or dataset", "subclass iwae_model.objectives.Objective"]),
}


@pytest.mark.parametrize("case", BAD_PLUGINS)
def test_a_bad_plugin_is_named_with_the_fix_and_registers_nothing(case, tmp_path, registry):
    code, words = BAD_PLUGINS[case]
    path = write_plugin(tmp_path, "bad_bounds", code)
    before = dict(OBJECTIVES), dict(DATASETS)
    with pytest.raises(PluginError) as error:
        load_plugin(str(path))
    assert str(error.value).startswith(f"plugin {path}")
    for word in words:
        assert word in str(error.value), (word, str(error.value))
    assert (OBJECTIVES, DATASETS) == before and "bad_bounds" not in sys.modules


def test_a_plugin_objective_is_a_setting_like_any_other(tmp_path, registry):
    plugin = load_plugin(
        "plugins/my_bounds.py", relative_to=write_plugin(tmp_path / "plugins", "my_bounds", TEMPERED).parents[1]
    )
    assert plugin.defines == ("objective tempered", "dataset synthetic") and plugin.module == "my_bounds"
    config = TrainConfig(objective="tempered", tau=2.0, k=4)
    assert config.label() == "tempered_L1_M1_K4_t2_s0" and config.to_dict()["tau"] == 2.0
    assert repr(config.build_objective()) == "TEMPERED(tau=2.0, K=4)"
    # A built-in objective's configuration does not carry the plugin's parameter at its default:
    # its checkpoints load without the plugin.
    assert "tau" not in TrainConfig(objective="iwae").to_dict() and sources_of(TrainConfig()) == []
    assert sources_of(config) == [plugin.record()]
    with pytest.raises(ValueError, match=r"tau=8: must be a number in \[0.25, 4\] \(temperature"):
        TrainConfig(objective="tempered", tau=8)
    with pytest.raises(ValueError, match="objective 'tempered' supports reparam, stl"):
        TrainConfig(objective="tempered", estimator="dreg")
    assert load_plugin(str(tmp_path / "plugins" / "my_bounds.py")) is plugin  # loaded once
    with pytest.raises(DataError, match=f"synthetic.npz not in {tmp_path}: put the files there"):
        load_dataset("synthetic", tmp_path)
    write_synthetic(tmp_path, test=np.full((100, 65), 0.5))
    with pytest.raises(DataError, match=r"its test split has shape \(100, 65\); Synthetic declares 100 images of 64"):
        load_dataset("synthetic", tmp_path)
    write_synthetic(tmp_path, valid=np.full((100, 64), 2.0))
    with pytest.raises(DataError, match=r"its valid split has values outside \[0, 1\]"):
        load_dataset("synthetic", tmp_path)
    write_synthetic(tmp_path)
    data = load_dataset("synthetic", tmp_path, binarization="static")
    assert data.train.shape == (400, 64) and set(data.train.unique().tolist()) == {0.0, 1.0}
    assert data.files == {"synthetic.npz": hashlib.sha256((tmp_path / "synthetic.npz").read_bytes()).hexdigest()}


def write_synthetic(folder, **replaced):
    """The synthetic dataset's file: blobs of grey levels, 8x8."""
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 1, (4, 64))
    splits = {name: centres[rng.integers(0, 4, n)] * 0.9 for name, n in (("train", 400), ("valid", 100), ("test", 100))}
    np.savez(folder / "synthetic.npz", **{**splits, **replaced})


def test_a_plugin_may_not_hide_an_installed_module_or_reuse_a_column_name(tmp_path, registry):
    with pytest.raises(PluginError, match=r"its module name 'yaml' is an installed module's, which it would hide"):
        load_plugin(str(write_plugin(tmp_path, "yaml", TEMPERED)))
    path = write_plugin(
        tmp_path / "columns", "column_bounds", TEMPERED.replace('Parameter("tau"', 'Parameter("test_nll"')
    )
    with pytest.raises(
        SpaceError, match=r"plugins: objective class Tempered .* \['test_nll'\] are the names of results"
    ):
        parse_space({"plugins": [str(path)], "experiments": [{"objective": "iwae"}]}, str(tmp_path / "space.yaml"))


def test_a_search_over_objectives_takes_each_one_s_own_estimator():
    space = parse_space(
        {
            "name": "search",
            "experiments": [{"objective": {"choice": ["iwae", "rws"]}, "k": 3}],
            "search": {"algorithm": "random", "samples": 2},
        },
        "<search>",
    )
    assert {t.estimator for t in drawn_trials(space)} <= {"reparam", "wake"} and space.metric == "valid_ll"


def test_the_train_and_evaluate_clis_take_a_plugin_and_its_checkpoints_name_it(tmp_path, mnist, registry):
    path = write_plugin(tmp_path / "bounds", "cli_bounds", TEMPERED)
    config, _ = parse_args(["--plugin", str(path), "--objective", "tempered", "--tau", "2", "--out", str(tmp_path)])
    assert (config.objective, config.tau) == ("tempered", 2.0)
    run_dir = tmp_path / "run"
    train(replace(config, passes=1, train_images=200, test_images=50), run_dir, small_mnist(mnist), progress=False)
    record = {"module": "cli_bounds", "file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert load_checkpoint(run_dir)["plugins"] == [record]
    evaluate = [sys.executable, "-m", "iwae_model.evaluate", str(run_dir), "--k", "5", "--images", "10"]
    without = subprocess.run(evaluate, capture_output=True, text=True, timeout=300)
    assert without.returncode == 1 and "Traceback" not in without.stderr
    assert f"trained with plugin cli_bounds ({path}), which defines its objective or dataset: pass --plugin" in (
        without.stderr
    )
    with_plugin = subprocess.run([*evaluate, "--plugin", str(path)], capture_output=True, text=True, timeout=300)
    assert with_plugin.returncode == 0, with_plugin.stderr[-2000:]
    assert "test TEMPERED(tau=2.0, K=5) bound" in with_plugin.stdout


def test_a_recorded_plugin_that_is_missing_or_changed_is_named(tmp_path, registry):
    path = write_plugin(tmp_path, "recorded_bounds", TEMPERED)
    record = {"module": "recorded_bounds", "file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    path.rename(tmp_path / "elsewhere.py")
    with pytest.raises(PluginError, match=f"the sweep's spec: plugin recorded_bounds \\({path}\\) is missing: put the"):
        load_recorded(record, "the sweep's spec")
    path.write_text(TEMPERED + "# edited\n")
    with pytest.raises(PluginError, match=f"plugin {path} changed since the sweep started"):
        load_recorded(record, "the sweep's spec")


def test_a_plugin_trains_through_a_sweep_resumes_and_is_refused_once_changed(tmp_path, mnist_dir, monkeypatch):
    """A bound and a dataset defined outside the repository, in no Ray worker's path: shipped by
    Ray to the trials, trained by a real sweep (real MNIST and the synthetic data) killed at its
    first checkpoint and resumed (the plugin found again from the sweep's spec), ranked by the
    fair metric against IWAE, in Parquet, the query's tables and HParams; its file edited
    afterwards refuses the next resume, naming it."""
    plugin = write_plugin(tmp_path / "bounds", "tempered_bound", TEMPERED)
    monkeypatch.setenv("IMPORTED_FROM", str(tmp_path / "imported_from.txt"))
    data_dir = tmp_path / "data"  # one folder holds every dataset's files
    data_dir.mkdir()
    for file in mnist_dir.iterdir():
        (data_dir / file.name).symlink_to(file)
    write_synthetic(data_dir)
    space = {
        "name": "own",
        "plugins": ["bounds/tempered_bound.py"],
        "experiments": [
            {"objective": "tempered", "tau": [0.5, 2.0], "k": 3},
            {"objective": "iwae", "k": 3, "dataset": ["mnist", "synthetic"]},
        ],
        "training": {"passes": 2, "train_images": 400, "test_images": 100, "valid_ll_k": 10},
        "evaluation": {"k": 20, "images": 20, "best": "top", "top": 4},
        "checkpoints": {"keep": 1, "every": 1},
    }
    command, sweep_dir = kill_sweep_at_first_checkpoint(space, tmp_path, data_dir, ".")
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    imported_from = set((tmp_path / "imported_from.txt").read_text().split())
    assert str(plugin) in imported_from  # the drivers
    assert any("runtime_resources" in where for where in imported_from), imported_from  # Ray's copy, in trials
    rows = pq.read_table(sweep_dir / "results" / "results.parquet").to_pylist()
    names = ["iwae_L1_M1_K3_s0", "synthetic_iwae_L1_M1_K3_s0", "tempered_L1_M1_K3_t0.5_s0", "tempered_L1_M1_K3_t2_s0"]
    assert sorted(r["trial_name"] for r in rows) == names
    record = {
        "module": "tempered_bound",
        "file": str(plugin),
        "sha256": hashlib.sha256(plugin.read_bytes()).hexdigest(),
    }
    for row in rows:
        if row["objective"] == "tempered":
            assert row["tau"] in (0.5, 2.0) and row["test_bound_name"] == f"TEMPERED(tau={row['tau']}, K=3)"
            assert json.loads(row["config"])["tau"] == row["tau"]
        else:
            assert row["tau"] == 1.0  # the parameter's default, as beta's
        plugin_made = row["objective"] == "tempered" or row["dataset"] == "synthetic"
        assert (json.loads(row["plugins"]) if plugin_made else row["plugins"]) == ([record] if plugin_made else None)
        assert row["eval_images"] == 20 and math.isfinite(row["test_nll"])
    trials = pq.read_table(sweep_dir / "results" / "trials.parquet").to_pylist()
    assert {t["rank_metric"] for t in trials} == {"valid_ll"}  # objectives differ: the fair metric
    sessions = hparams_sessions(sweep_dir)
    taus = sorted(session["tau"] for session, _ in sessions.values() if session["objective"] == "tempered")
    assert taus == [0.5, 2.0]
    query = [sys.executable, "-m", "sweep.query", str(sweep_dir)]
    refused = subprocess.run(query, capture_output=True, text=True)  # a results file never runs code by itself
    assert refused.returncode == 1 and f"made with plugin tempered_bound ({plugin}): pass --plugin" in refused.stderr
    query = subprocess.run([*query, "--plugin", str(plugin)], capture_output=True, text=True)
    assert query.returncode == 0, query.stderr[-2000:]
    assert all(column in query.stdout for column in ("TEMPERED(τ=0.5)", "TEMPERED(τ=2)", "| IWAE"))
    synthetic = query.stdout[query.stdout.index("Synthetic 8x8 blobs (a test plugin's dataset):") :]
    assert "30.00" in synthetic.split("\n\n")[0]  # the dataset's published value beside its row
    plugin.write_text(plugin.read_text() + "# tuned after the sweep\n")
    refused = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"plugin {plugin} changed since the sweep started" in refused.stderr, refused.stderr[-2000:]


def test_a_sweep_with_a_bad_plugin_stops_before_ray_with_the_file_named(tmp_path, mnist_dir):
    write_plugin(tmp_path / "bounds", "broken", "import no_such_package\n")
    (tmp_path / "space.yaml").write_text(
        yaml.safe_dump({"plugins": ["bounds/broken.py"], "experiments": [{"objective": "iwae"}]})
    )
    run = subprocess.run(
        [sys.executable, "-m", "sweep.run", "--space", str(tmp_path / "space.yaml"), "--storage", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert f"plugins: plugin {tmp_path / 'bounds' / 'broken.py'}: does not import" in run.stderr, run.stderr
