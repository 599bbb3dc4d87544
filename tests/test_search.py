"""Searches: distributions in a space file, random and Optuna search through Ray Tune, the fair
metric, a killed and resumed search, and what the query makes of one (real Ray, real MNIST)."""

import json
import math
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import kill_driver, trial_dirs, wait_for_checkpoint
from pyarrow import fs as pafs

from iwae_model import TrainConfig
from iwae_model.checkpoint import load_checkpoint
from sweep.folder import write_spec
from sweep.query import main as query_main
from sweep.results import read_trials
from sweep.run import run_sweep
from sweep.space import FAIR_K, SpaceError, load_space, parse_space

# The fair metric's k in the sweeps below: FAIR_K's estimate costs seconds per pass, and these test
# what ranks the trials, not its accuracy.
VALID_LL_K = 100
TINY_TRAINING = {
    "passes": 2,
    "train_images": 200,
    "test_images": 20,
    "latent_dims": [4],
    "hidden_dims": [16],
    "schedule": "constant",
}


def search_space(name: str, search: dict, experiments=None, **training) -> dict:
    return {
        "name": name,
        "experiments": experiments or [{"objective": "iwae", "k": 2}],
        "training": {**TINY_TRAINING, "lr": {"loguniform": [1.0e-4, 1.0e-2]}, **training},
        "search": search,
        "evaluation": {"k": 20, "images": 10},
        "checkpoints": {"keep": 1, "every": 1},
    }


BAD_SPECS = {  # name: (the space's changes, words the error must hold)
    "unknown distribution": ({"training": {"lr": {"normal": [0, 1]}}}, ["training.lr", "known: uniform"]),
    "low >= high": ({"training": {"lr": {"uniform": [0.01, 0.001]}}}, ["training.lr", "low must be below high"]),
    "log range reaching 0": ({"training": {"lr": {"loguniform": [0.0, 0.01]}}}, ["a log range must stay above 0"]),
    "empty choice": ({"experiments": [{"objective": "iwae", "k": {"choice": []}}]}, ["experiments[0].k", "non-empty"]),
    "continuous layers": (
        {"experiments": [{"objective": "iwae", "layers": {"uniform": [1, 2]}}]},
        ["experiments[0].layers", "layers takes an integer: randint"],
    ),
    "a range on a string key": ({"training": {"schedule": {"uniform": [0, 1]}}}, ["schedule takes only choice"]),
    "a bad value in a choice": (
        {"experiments": [{"objective": "iwae", "k": {"choice": [1, 0]}}]},
        ["experiments[0].k", "{'k': 0}", "positive integer"],
    ),
    "searched twice": (
        {"experiments": [{"objective": "iwae", "lr": {"uniform": [0.001, 0.002]}}]},
        ["already searched at training.lr"],
    ),
    "no search section": ({"search": None}, ["needs a `search` section"]),
    "a search of nothing": ({"training": TINY_TRAINING}, ["no key is a distribution"]),
    "unknown algorithm": ({"search": {"algorithm": "hyperband"}}, ["search.algorithm", "random, optuna"]),
    "optuna with a grid axis": (
        {"experiments": [{"objective": "iwae", "k": [2, 3]}], "search": {"algorithm": "optuna"}},
        ["optuna cannot take a grid axis", "{choice: [1, 5, 50]}"],
    ),
    "optuna with a choice of lists": (
        {
            "search": {"algorithm": "optuna"},
            "experiments": [{"objective": "iwae", "latent_dims": {"choice": [[4], [8]]}}],
        },
        ["optuna's choices are numbers or strings"],
    ),
    "a distribution inside continue": (
        {
            "continue": {
                "training": {"lr": {"uniform": [0.001, 0.002]}},
                "switch": [{"from": {"objective": "iwae"}, "to": {"k": 3}}],
            },
            "search": None,
            "training": TINY_TRAINING,
        },
        ["continue.training.lr", "a distribution inside `continue`"],
    ),
    "negative samples": ({"search": {"samples": 0}}, ["samples and max_concurrent must be positive"]),
}


@pytest.mark.parametrize("bad", BAD_SPECS)
def test_a_bad_search_spec_is_named_before_anything_runs(bad):
    changes, words = BAD_SPECS[bad]
    spec = {**search_space("bad", {"algorithm": "random", "samples": 2}), **changes}
    with pytest.raises(SpaceError) as raised:
        parse_space({key: value for key, value in spec.items() if value is not None}, "bad.yaml")
    assert str(raised.value).startswith("bad.yaml: ") and all(word in str(raised.value) for word in words), raised.value


def test_a_search_ranks_by_the_fair_metric_where_objectives_or_k_differ():
    optimizer_only = parse_space(search_space("lr", {"samples": 2}), "<lr>")
    assert optimizer_only.metric == "valid_bound" and optimizer_only.trials[0].valid_ll_k == 0
    over_k = parse_space(search_space("k", {"samples": 2}, [{"objective": "iwae", "k": {"choice": [1, 5]}}]), "<k>")
    assert over_k.metric == "valid_ll" and over_k.trials[0].valid_ll_k == FAIR_K
    grid = parse_space(search_space("grid", {"samples": 2}, [{"objective": ["vae", "iwae"], "k": 2}]), "<grid>")
    assert grid.metric == "valid_ll" and len(grid.trials) == 2


def test_a_grid_under_asha_ranks_by_the_fair_metric_where_objectives_differ(tmp_path):
    spec = {key: value for key, value in search_space("asha", {}).items() if key != "search"}
    objectives = parse_space(
        {**spec, "training": TINY_TRAINING, "experiments": [{"objective": ["vae", "iwae"], "k": 2}]}, "<asha>"
    )
    assert objectives.metric == "valid_bound"  # each trial's own best checkpoint: its own bound is fine
    early = objectives.with_asha()
    assert early.metric == "valid_ll" and {t.valid_ll_k for t in early.trials} == {FAIR_K}
    assert type(early).from_dict(early.to_dict()) == early  # the spec file keeps it
    optimizer_only = parse_space(
        {**spec, "training": TINY_TRAINING, "experiments": [{"objective": "iwae", "k": 2, "lr": [1e-3, 1e-4]}]}, "<lr>"
    ).with_asha()
    assert optimizer_only.metric == "valid_bound" and optimizer_only.early_stopped
    # The scheduler is fixed when a sweep starts: a resume cannot add it.
    write_spec(str(tmp_path / "asha"), pafs.LocalFileSystem(), objectives, "data")
    with pytest.raises(SpaceError, match="--asha: the sweep in .* was started without it"):
        run_sweep(objectives, str(tmp_path), "data", resume=True, asha=True)


def drawn(sweep_dir) -> list[dict]:
    """Each trial's drawn values, as its checkpoint's configuration says it trained."""
    configs = [
        TrainConfig.from_dict(load_checkpoint(sorted(trial.glob("checkpoint_*"))[-1])["config"])
        for trial in trial_dirs(sweep_dir)
    ]
    return sorted(({"lr": c.lr, "k": c.k} for c in configs), key=lambda d: d["lr"])


def test_random_search_draws_distinct_values_in_range_reproducibly(local_ray, mnist_dir, tmp_path):
    # One pass on 100 images: what is checked is the draws and what records them, not the training.
    spec = search_space(
        "random",
        {"algorithm": "random", "samples": 3, "seed": 7},
        [{"objective": "iwae", "k": {"choice": [1, 2, 3]}}],
        passes=1,
        train_images=100,
        valid_ll_k=VALID_LL_K,
    )
    runs = []
    for folder in ("first", "second"):
        path, rows, failed = run_sweep(parse_space(spec, "<random>"), str(tmp_path / folder), str(mnist_dir))
        assert not failed and len(rows) == 3
        runs.append(drawn(tmp_path / folder / "random"))
    first, second = runs
    assert first == second  # the same seed draws the same trials
    assert len({d["lr"] for d in first}) == 3 and all(1e-4 <= d["lr"] <= 1e-2 and d["k"] in (1, 2, 3) for d in first)
    table = pq.read_table(path).to_pylist()
    assert {r["rank_metric"] for r in table} == {"valid_ll"} and {r["rank_metric_k"] for r in table} == {VALID_LL_K}
    for row in table:  # the drawn values in Parquet, and in the label with the trial's number
        values = json.loads(row["searched"])
        assert f"_lr{values['lr']:.3g}_trial" in row["trial_name"] and f"_K{values['k']}_" in row["trial_name"]
        assert math.isfinite(row["rank_metric_value"])
    trials = read_trials(str(tmp_path / "second" / "random")).to_pylist()  # every trial, evaluated or not
    assert sorted(t["trial_name"] for t in trials) == sorted(r["trial_name"] for r in table)
    assert {t["status"] for t in trials} == {"finished"} and {t["rank_metric"] for t in trials} == {"valid_ll"}


SAMPLES = 4  # max_concurrent 2: the kill leaves at least two to draw after the resume


def test_an_optuna_search_trains_its_suggestions_and_resumes_the_same_study(local_ray, mnist_dir, tmp_path, capsys):
    search = {"algorithm": "optuna", "samples": SAMPLES, "seed": 3, "max_concurrent": 2}
    distributions = [{"objective": "iwae", "k": {"choice": [1, 2]}}]
    spec = search_space("optuna", search, distributions, passes=2, train_images=400, valid_ll_k=VALID_LL_K)
    # The uninterrupted search to compare with, in this process, trains one pass on 200 images: with
    # fewer trials than TPE's 10 random start-up ones, Optuna's draws depend on its seed alone.
    uninterrupted = search_space("optuna", search, distributions, passes=1, valid_ll_k=VALID_LL_K)
    _, _, failed = run_sweep(parse_space(uninterrupted, "<optuna>"), str(tmp_path / "whole"), str(mnist_dir))
    assert not failed
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "sweep.run", "--space", str(tmp_path / "space.yaml"), "--data-dir", str(mnist_dir)]
    driver = subprocess.Popen(
        [*command, "--storage", str(tmp_path / "killed")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_checkpoint(driver, tmp_path / "killed" / "optuna", "checkpoint_000001")
    finally:
        kill_driver(driver)
    started = len(trial_dirs(tmp_path / "killed" / "optuna"))
    # Resumed in this process (its Ray already up): the study comes back from the killed driver's
    # files alone. The command's own --resume after a kill: test_killed_driver, test_sweep_interrupted.
    resumed = parse_space(spec, str(tmp_path / "space.yaml"))
    _, _, failed = run_sweep(resumed, str(tmp_path / "killed"), str(mnist_dir), resume=True)
    assert not failed
    assert 1 <= started < SAMPLES
    # Optuna's suggestions are what the trials trained, and the resumed study drew the rest: all
    # trials in all, none twice, the same as the uninterrupted search with that seed.
    assert drawn(tmp_path / "killed" / "optuna") == drawn(tmp_path / "whole" / "optuna")
    assert len(trial_dirs(tmp_path / "killed" / "optuna")) == SAMPLES
    for sweep in ("whole", "killed"):
        ray_configs = sorted(
            json.loads((trial / "params.json").read_text())["search"]["lr"]
            for trial in trial_dirs(tmp_path / sweep / "optuna")
        )
        assert ray_configs == [d["lr"] for d in drawn(tmp_path / sweep / "optuna")]
    # The query: trials best first by the fair metric, the drawn values, the test NLL beside them.
    capsys.readouterr()  # the sweeps' own output
    query_main(
        [
            str(tmp_path / "whole" / "optuna"),
            "--importance",
            "--parallel-plot",
            str(tmp_path / "parallel.png"),
            "--slice-plot",
            str(tmp_path / "slice.png"),
        ]
    )
    out = capsys.readouterr().out
    assert f"best first by valid_ll (k={VALID_LL_K})" in out and "| trial | k | lr |" in out
    names = [line.split(" | ")[0][2:] for line in out.splitlines() if line.startswith("| iwae_")]
    assert len(set(names)) == SAMPLES and all("_trial" in name for name in names)  # each trial named apart
    values = [float(line.split(" | ")[3]) for line in out.splitlines() if line.startswith("| iwae_")]
    assert len(values) == SAMPLES and values == sorted(values, reverse=True)
    assert "Importance of each searched parameter for valid_ll" in out and "the figures become meaningful" in out
    shares = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if line.startswith("  ")}
    assert set(shares) == {"k", "lr"} and abs(sum(shares.values()) - 1) < 1e-6
    assert (tmp_path / "parallel.png").stat().st_size > 10_000 and (tmp_path / "slice.png").stat().st_size > 10_000


@pytest.mark.parametrize("name", ["ciwae_search", "ciwae_search_quick"])
def test_the_shipped_searches_are_optuna_searches_ranked_fairly(name):
    space = load_space(name)
    assert space.search.algorithm == "optuna" and set(space.search.distributions) == {"beta", "lr"}
    assert space.metric == "valid_ll" and all(t.valid_ll_k == FAIR_K for t in space.trials)
