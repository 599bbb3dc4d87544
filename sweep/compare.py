"""Paired comparisons of evaluated checkpoints: every checkpoint of a sweep is evaluated on the
same fixed-binarised test images (and, where the models' latent sizes match, with the same
q-noise per image), so the difference of two NLLs has a standard error over the per-image
differences, usually far smaller than the two means' independent errors combined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from iwae_model.errors import IWAEError

from .results import PER_IMAGE_FILE, RESULTS_FILE, read_per_image


class CompareError(IWAEError, ValueError):
    """A comparison that cannot be made; the message names what and the fix."""


@dataclass
class Difference:
    """mean over images of NLL(a) - NLL(b), nats, with its paired and unpaired standard errors."""

    mean: float
    paired_se: float
    unpaired_se: float
    images: int


def difference(nll_a: np.ndarray, nll_b: np.ndarray) -> Difference:
    n = len(nll_a)
    if n != len(nll_b) or n < 2:
        raise CompareError(
            f"a paired difference needs the same 2 or more images on both sides, got {n} and {len(nll_b)}"
        )
    unpaired = math.sqrt((nll_a.var(ddof=1) + nll_b.var(ddof=1)) / n)
    return Difference(float((nll_a - nll_b).mean()), float((nll_a - nll_b).std(ddof=1) / math.sqrt(n)), unpaired, n)


def beside_results(location: str, file: str = PER_IMAGE_FILE) -> str:
    """Results `file` (results/per_image.parquet, ...) beside a results file, or in a sweep folder."""
    results_name = RESULTS_FILE.rsplit("/", 1)[1]
    if location.rstrip("/").endswith(results_name):
        return location.rstrip("/")[: -len(results_name)] + file.rsplit("/", 1)[1]
    return location


def load_per_image(location: str) -> pd.DataFrame:
    return read_per_image(beside_results(location)).to_pandas()


def where(frame: pd.DataFrame, conditions: list[str], what: str) -> pd.DataFrame:
    """The rows whose COLUMN equals VALUE for every COLUMN=VALUE of `conditions` (compared as text);
    `what` names the option in the error."""
    for condition in conditions:
        column, sep, value = condition.partition("=")
        if not sep or column not in frame.columns:
            raise CompareError(
                f"{what}: {condition!r} is not COLUMN=VALUE with a column ({column!r} is not a "
                f"column); use one of {', '.join(frame.columns)}"
            )
        frame = frame[frame[column].astype(str) == value]
    return frame


def select(frame: pd.DataFrame, selector: str, what: str) -> pd.DataFrame:
    """Rows named by a trial label (e.g. iwae_L1_M1_K50_s0) or COLUMN=VALUE[,COLUMN=VALUE...]."""
    if "=" not in selector:
        chosen = frame[frame["trial_name"] == selector]
        if chosen.empty:
            raise CompareError(
                f"{what} {selector!r}: no trial of that label; labels here: "
                f"{', '.join(sorted(frame['trial_name']))} (or give COLUMN=VALUE filters)"
            )
        return chosen
    chosen = where(frame, selector.split(","), f"{what} {selector!r}")
    if chosen.empty:
        raise CompareError(f"{what} {selector!r}: no row matches")
    return chosen


def select_one(frame: pd.DataFrame, selector: str, what: str) -> pd.Series:
    chosen = select(frame, selector, what)
    if len(chosen) > 1:
        raise CompareError(
            f"{what} {selector!r} matches {len(chosen)} checkpoints "
            f"({', '.join(chosen['trial_name'])}); add filters (e.g. seed=0) to name one"
        )
    return chosen.iloc[0]


def image_nll(per_image: pd.DataFrame, row: pd.Series) -> np.ndarray:
    """The checkpoint's per-image NLLs `[images]` in image order, from the same evaluation as its row."""
    rows = per_image[(per_image["evaluation_id"] == row["evaluation_id"]) & (per_image["trial_id"] == row["trial_id"])]
    if len(rows) != row["eval_images"]:
        raise CompareError(
            f"{row['trial_name']}: {PER_IMAGE_FILE} holds {len(rows)} of its {row['eval_images']} "
            f"images for evaluation {row['evaluation_id']} (the two files are from different "
            f"evaluations, e.g. after a crash between their writes); re-run python -m sweep.evaluate SWEEP_DIR"
        )
    return rows.sort_values("image")["nll"].to_numpy()


def mean_image_nll(per_image: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
    """Per-image NLL averaged over several checkpoints (e.g. a table cell's seeds)."""
    return np.mean([image_nll(per_image, row) for _, row in rows.iterrows()], axis=0)


def check_same_images(a: pd.Series, b: pd.Series) -> None:
    if a["eval_images"] != b["eval_images"] or a["eval_k"] != b["eval_k"]:
        raise CompareError(
            f"{a['trial_name']} was evaluated on {a['eval_images']} images with k={a['eval_k']}, "
            f"{b['trial_name']} on {b['eval_images']} with k={b['eval_k']}: a paired comparison needs "
            f"the same evaluation; re-run python -m sweep.evaluate SWEEP_DIR"
        )


def comparison_text(a: pd.Series, b: pd.Series, per_image: pd.DataFrame) -> str:
    check_same_images(a, b)
    d = difference(image_nll(per_image, a), image_nll(per_image, b))
    common = "yes" if a["noise"] == b["noise"] else f"no (different q-noise streams: {a['noise']} / {b['noise']})"
    lines = [
        f"A  {a['trial_name']:<28} test NLL {a['test_nll']:.3f} ± {a['test_nll_se']:.3f}",
        f"B  {b['trial_name']:<28} test NLL {b['test_nll']:.3f} ± {b['test_nll_se']:.3f}",
        f"A - B = {d.mean:+.3f} nats over the same {d.images} test images (k={a['eval_k']}); common noise: {common}",
        f"  paired SE   {d.paired_se:.4f}  (the spread of the per-image differences)",
        f"  unpaired SE {d.unpaired_se:.4f}  (as if the two were independent estimates)",
    ]
    if d.paired_se > 0:
        lines.append(
            f"  the paired comparison is {d.unpaired_se / d.paired_se:.1f}x more precise; "
            f"the difference is {abs(d.mean) / d.paired_se:.1f} paired SEs from zero"
        )
    return "\n".join(lines)
