"""What a trial is, apart from Ray: its TrainConfig from the config Ray Tune gives it, its name
and label, its node record (`nodes.json` in each checkpoint) and its trials.parquet row. Reading
these needs neither Ray nor the trainable, so the query and the live view do not import them."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iwae_model import TrainConfig
from iwae_model.checkpoint import CheckpointError
from iwae_model.objectives import OBJECTIVES

from .results import search_columns
from .space import SweepSpace

if TYPE_CHECKING:
    from ray import tune

# The keys TrainConfig.label() shows (and the objective's own parameters): a search's label adds
# the others it draws.
LABELLED = ("dataset", "objective", "layers", "m", "k", "estimator", "seed")
NODES_FILE = "nodes.json"  # in each checkpoint: every node the trial ran on, from which pass, on which device


def trial_config(config: dict[str, Any]) -> TrainConfig:
    """A Ray trial's TrainConfig: its grid point, with the values the searcher drew for it."""
    return TrainConfig.from_dict(config["train"]).with_changes(**(config.get("search") or {}))


def trial_name(config: TrainConfig, searched: Iterable[str], trial_id: str | None) -> str:
    """The configuration's label; in a search, with the values drawn and the trial's number (Ray's
    random search) or id (a searcher's), e.g. ciwae_L1_M1_K64_b0.31_s0_lr0.00042_trial3, so that
    samples of one grid point stay apart."""
    label = config.label()
    if not searched:
        return label
    own = {p.name for p in OBJECTIVES[config.objective].parameters}
    drawn = [key for key in sorted(searched) if key not in (*LABELLED, *own)]
    label += "".join(f"_{key}{_short(getattr(config, key))}" for key in drawn)
    if not trial_id:
        return label
    number = trial_id.rsplit("_", 1)[-1]
    return f"{label}_trial{int(number)}" if number.isdigit() else f"{label}_trial{trial_id}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


def trial_folder(checkpoint: Any) -> str:
    """The folder of the trial a Ray Tune checkpoint belongs to (its TensorBoard run), on the
    checkpoint's filesystem."""
    return checkpoint.path.rstrip("/").rsplit("/", 1)[0]


def trial_label(trial: Any) -> str:
    """`trial_name` of a Ray trial or result (anything with the trial config)."""
    trial_id = getattr(trial, "trial_id", None) or (getattr(trial, "metrics", None) or {}).get("trial_id")
    return trial_name(trial_config(trial.config), trial.config.get("search") or {}, trial_id)


def read_nodes(path: Path) -> list[dict]:
    """A checkpoint's node record ([] for checkpoints made before it existed)."""
    if not path.is_file():
        return []
    try:
        nodes = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        nodes = None
    if not isinstance(nodes, list) or not all(isinstance(node, dict) for node in nodes):
        raise CheckpointError(
            f"{path}: damaged (it should be a JSON list of the nodes the trial ran on); delete it -- it "
            f"only records where the trial ran, the checkpoint itself is not affected"
        )
    return nodes


def score(result: tune.Result, metric: str) -> float | None:
    """A trial's best value of `metric` over its kept checkpoints (its last report's without one)."""
    return max((m[metric] for _, m in result.best_checkpoints), default=result.metrics.get(metric))


def trial_rows(grids: list[list[tune.Result]], space: SweepSpace) -> list[dict[str, Any]]:
    """Every trial as a trials.parquet row (results.TRIALS_SCHEMA), evaluated or not."""
    return [trial_row(result, space) for grid in grids for result in grid]


def trial_row(result: tune.Result, space: SweepSpace, status: str | None = None) -> dict[str, Any]:
    """A trial's trials.parquet row; `status` where the result does not tell (a running trial)."""
    config, epochs = trial_config(result.config), result.metrics.get("epoch", 0)
    if status is None:
        status = "failed" if result.error is not None else "finished" if epochs >= config.passes else "not finished"
    searched = sorted(space.search.distributions) if space.search else []
    return {
        "trial_id": result.metrics.get("trial_id"),
        "trial_name": trial_label(result),
        "status": status,
        "epochs": epochs,
        **search_columns(config, space.metric, searched),
        "rank_metric_value": score(result, space.metric) if result.metrics else None,
    }
