"""TensorBoard's HParams tab for a sweep, grid or search: one session per trial, its
configuration (the settings that vary across the sweep and the ones a reader needs) and its
final figures (the metric that ranked it, the validation bound, and once evaluated the k-sample
test NLL, the share of its images with PSIS k̂ > 0.7 and, with `evaluation.ais`, the AIS NLL and
AIS - IS), in `<sweep>/hparams/<trial>`.

Ray Tune's own HParams rows (each trial's 25 flattened settings and training scalars, nothing
from the evaluation) are left out (`ray_private.RayScalarsOnly`), so the tab shows one row per trial.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from pyarrow import fs as pafs
from ray import tune

from iwae_model import TrainConfig

from .tensorboard_files import events_written_to
from .trials import trial_config, trial_label

HPARAMS_DIR = "hparams"
EVALUATED = ("test_nll", "pareto_k_above_0_7", "ais_nll", "ais_minus_is")  # a results row's final figures
ALWAYS_SHOWN = ("dataset", "objective", "layers", "m", "k", "estimator", "lr", "passes", "batch_size", "seed")


def _value(value: Any) -> int | float | str | bool:
    return value if isinstance(value, (int, float, str, bool)) else str(value)


def hparam_rows(grids: list[list[tune.Result]], rows: list[dict]) -> dict[str, tuple[dict, dict]]:
    """{trial label: (hparams, metrics)} of every trial that reported a pass."""
    results = [result for grid in grids for result in grid if result.metrics]
    configs = {id(result): trial_config(result.config).to_dict() for result in results}
    shown = [
        field.name
        for field in dataclasses.fields(TrainConfig)
        if field.name in ALWAYS_SHOWN or len({str(config[field.name]) for config in configs.values()}) > 1
    ]  # the settings that vary
    if any(config["objective"] == "ciwae" for config in configs.values()) and "beta" not in shown:
        shown.append("beta")
    evaluated = {row["trial_id"]: row for row in rows}
    sessions = {}
    for result in results:
        config = configs[id(result)]
        metrics = {name: result.metrics[name] for name in ("valid_bound", "valid_ll") if name in result.metrics}
        if (row := evaluated.get(result.metrics.get("trial_id"))) is not None:
            metrics.update(
                {
                    name: row[name]
                    for name in EVALUATED
                    if row[name] is not None and math.isfinite(row[name])  # null: AIS off
                }
            )
        sessions[trial_label(result)] = ({key: _value(config[key]) for key in shown}, metrics)
    return sessions


def write_hparams(folder: str, filesystem: pafs.FileSystem, grids: list[list[tune.Result]], rows: list[dict]) -> None:
    """The sweep's HParams sessions into `<folder>/hparams` (replacing an earlier evaluation's);
    written locally, then copied through the storage filesystem (TensorBoard cannot write to S3)."""
    destination = f"{folder}/{HPARAMS_DIR}"
    if filesystem.get_file_info(destination).type == pafs.FileType.Directory:
        filesystem.delete_dir(destination)
    with events_written_to(destination, filesystem) as writer:
        for label, (hparams, metrics) in hparam_rows(grids, rows).items():
            writer.add_hparams(hparams, {f"final/{name}": value for name, value in metrics.items()}, run_name=label)
