"""TensorBoard's HParams tab for a sweep, grid or search: one session per trial, in the trial's own
folder (so its row and its curves are one run, named by the trial), with its configuration (the
settings that vary across the sweep, then the ones a reader needs) and as its figures the last
value of its curves and evaluated scalars: the validation bound and fair metric, and once
evaluated the k-sample test NLL, the share of images with PSIS k̂ > 0.7 and, with
`evaluation.ais`, the AIS NLL and AIS - IS.

TensorBoard orders the columns by whether the setting varies, then by name, and ticks the first
five: the experiment written here marks which vary (`differs`), so those come first. Ray Tune's
own HParams rows are never written (`ray_private.TrialCurves`).
"""

from __future__ import annotations

from typing import Any

from pyarrow import fs as pafs
from ray import tune
from tensorboard.plugins.hparams.api_pb2 import Status
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch.utils.tensorboard.summary import hparams

from iwae_model.config import settings
from iwae_model.objectives import OBJECTIVES

from .tensorboard_files import events_written_to
from .trainable import CURVE_TAGS
from .trials import trial_config, trial_label

# The session's figures: tags of the trial's run (the curves TrialCurves writes, the evaluation's).
METRICS = (
    CURVE_TAGS["valid_bound"],
    CURVE_TAGS["valid_ll"],
    *(f"evaluation/{name}" for name in ("test_nll", "pareto_k_above_0_7", "ais_nll", "ais_minus_is")),
)
ALWAYS_SHOWN = ("dataset", "objective", "layers", "m", "k", "estimator", "lr", "passes", "batch_size", "seed")


def _value(value: Any) -> int | float | str | bool:
    return value if isinstance(value, (int, float, str, bool)) else str(value)


def hparam_rows(grids: list[list[tune.Result]]) -> tuple[dict[str, dict], list[str]]:
    """({trial label: its shown settings} of every trial that reported a pass, the settings that
    vary across them)."""
    results = [result for grid in grids for result in grid if result.metrics]
    configs = {trial_label(result): trial_config(result.config) for result in results}
    names = [setting.name for setting in settings()]
    varying = [name for name in names if len({str(getattr(config, name)) for config in configs.values()}) > 1]
    # An objective's parameters wherever a trial trains that objective (CIWAE's beta).
    own = {p.name for config in configs.values() for p in OBJECTIVES[config.objective].parameters}
    shown = [name for name in names if name in (*ALWAYS_SHOWN, *varying, *own)]
    return {label: {key: _value(getattr(config, key)) for key in shown} for label, config in configs.items()}, varying


def _with_plugin_data(summary: Any, change: Any) -> Any:
    """`summary` (one HParams plugin summary) with `change` applied to its plugin data."""
    metadata = summary.value[0].metadata.plugin_data
    data = HParamsPluginData.FromString(metadata.content)
    change(data)
    metadata.content = data.SerializeToString()
    return summary


def write_hparams(
    folder: str, filesystem: pafs.FileSystem, grids: list[list[tune.Result]], rows: list[dict[str, Any]]
) -> None:
    """Each trial's HParams session into its folder in sweep `folder` (a stage-1 trial of another
    sweep, --init-from-sweep, is that sweep's), replacing an earlier evaluation's; written locally,
    then copied through the storage filesystem (TensorBoard cannot write to S3). `rows`: the
    evaluated results; a figure no trial has (no valid_ll, no AIS) gets no column."""
    sessions, varying = hparam_rows(grids)
    absent = set()
    if not any(trial_config(result.config).valid_ll_k for grid in grids for result in grid):
        absent.add(CURVE_TAGS["valid_ll"])
    if all(row["ais_nll"] is None for row in rows):
        absent.update({"evaluation/ais_nll", "evaluation/ais_minus_is"})
    metrics = dict.fromkeys((name for name in METRICS if name not in absent), 0.0)

    def mark_varying(data: HParamsPluginData) -> None:
        for info in data.experiment.hparam_infos:
            info.differs = info.name in varying

    for result in (result for grid in grids for result in grid if result.metrics):
        if not result.path.startswith(f"{folder}/"):
            continue
        experiment, start, end = hparams(sessions[trial_label(result)], metrics)
        if result.error is not None:
            _with_plugin_data(end, lambda data: setattr(data.session_end_info, "status", Status.STATUS_FAILURE))
        with events_written_to(result.path, filesystem, "hparams") as writer:
            for summary in (_with_plugin_data(experiment, mark_varying), start, end):
                writer.file_writer.add_summary(summary)
