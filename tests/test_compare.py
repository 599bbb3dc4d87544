"""Paired differences and the results files they read, without Ray: the maths, and two files
from different evaluations."""

import math
import subprocess
import sys

import numpy as np
import pytest
from pyarrow import fs as pafs

from sweep.columns import RESULTS
from sweep.compare import CompareError, difference
from sweep.results import per_image_table, write_results, write_table


def test_paired_and_unpaired_standard_errors():
    rng = np.random.default_rng(0)
    images = rng.normal(90, 25, size=1000)  # the images' own spread, shared by both models
    a, b = images + rng.normal(0, 0.1, 1000), images - 1 + rng.normal(0, 0.1, 1000)
    d = difference(a, b)
    assert d.mean == pytest.approx(np.mean(a - b)) and d.images == 1000
    assert d.paired_se == pytest.approx(np.std(a - b, ddof=1) / math.sqrt(1000))
    assert d.unpaired_se == pytest.approx(math.sqrt(np.var(a, ddof=1) / 1000 + np.var(b, ddof=1) / 1000))
    assert d.unpaired_se > 50 * d.paired_se and abs(d.mean - 1) < 5 * d.paired_se
    with pytest.raises(CompareError, match="same 2 or more images"):
        difference(a, b[:10])


def rows(evaluation_id="e1", images=3):
    base = dict.fromkeys(RESULTS.arrow().names)
    return [
        {
            **base,
            "trial_id": f"t{i}",
            "trial_name": f"iwae_L1_M1_K{i}_s0",
            "objective": "iwae",
            "seed": 0,
            "eval_images": images,
            "eval_k": 50,
            "test_nll": 90.0 + i,
            "evaluation_id": evaluation_id,
        }
        for i in (1, 2)
    ]


def write_sweep(folder, results, per_image_id):
    write_results(results, f"{folder}/results/results.parquet", pafs.LocalFileSystem())
    parts = [
        {
            "evaluation_id": per_image_id,
            "trial_id": f"t{i}",
            "trial_name": f"iwae_L1_M1_K{i}_s0",
            "checkpoint_uri": "x",
            "image": np.arange(3),
            "nll": np.full(3, 90.0 + i),
            "ess": np.ones(3),
            "pareto_k": np.zeros(3),
            "ais_nll": np.full(3, np.nan),  # no AIS
        }
        for i in (1, 2)
    ]
    write_table(per_image_table(parts), f"{folder}/results/per_image.parquet", pafs.LocalFileSystem())


def test_results_and_per_image_from_different_evaluations_are_refused(tmp_path):
    write_sweep(tmp_path, rows("new"), per_image_id="old")  # e.g. a crash between the two writes
    out = subprocess.run(
        [sys.executable, "-m", "sweep.query", str(tmp_path), "--compare", "iwae_L1_M1_K1_s0", "iwae_L1_M1_K2_s0"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "holds 0 of its 3 images for evaluation new" in out.stderr and "sweep.evaluate" in out.stderr
