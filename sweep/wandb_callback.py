"""Ray Tune's `WandbLoggerCallback` as a sweep uses it (sweep.trackers), and a trial's evaluation
logged to its W&B run. A module of its own: importing W&B costs every command a second of start-up
when no tracker is asked for."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import wandb
from ray import tune
from ray.air.constants import TRAINING_ITERATION
from ray.air.integrations.wandb import WandbLoggerCallback
from ray.tune.result import AUTO_RESULT_KEYS

from .space import SweepSpace
from .trackers import evaluation_figures, evaluation_tags, run_params, write_image_grids
from .trials import trial_label

# Ray's bookkeeping (timings, host, pid, ...) kept out of the run, which shows what the trial reports.
RAY_BOOKKEEPING = sorted({*AUTO_RESULT_KEYS, *WandbLoggerCallback.AUTO_CONFIG_KEYS} - {TRAINING_ITERATION})


def init_settings(space: SweepSpace, folder: str) -> dict[str, Any]:
    """`wandb.init` keywords every run of sweep `folder` shares: its project and group (the sweep's
    name), its files in the sweep folder when that is local, and W&B's mode as this driver has it
    (the logging processes are Ray workers, which do not see a variable set after Ray started)."""
    return {
        "project": space.name,
        "group": space.name,
        **({"dir": folder} if "://" not in folder else {}),
        **({"mode": os.environ["WANDB_MODE"]} if os.environ.get("WANDB_MODE") else {}),
        "settings": {"silent": True},  # the live table, not W&B's banner per trial
    }


class SweepWandbCallback(WandbLoggerCallback):
    """Ray Tune's W&B logger, each trial a W&B run whose id is its Ray trial id (so a resumed sweep
    continues it), named by its label, its parameters as `run_params`, its metrics as the trial
    reports them without Ray's bookkeeping, at step `training_iteration`."""

    def __init__(self, space: SweepSpace, folder: str) -> None:
        self.space, self.folder = space, folder
        self.shared = init_settings(space, folder)
        super().__init__(excludes=RAY_BOOKKEEPING, **self.shared)

    def log_trial_start(self, trial: Any) -> None:
        # Ray passes `self.kwargs` to wandb.init last, over its own per-trial choices.
        self.kwargs = {
            **self.shared,
            "name": trial_label(trial),
            "config": run_params(self.space, trial.config),
            "resume": "allow",
            "reinit": "finish_previous",  # Ray's `True` is deprecated; one run per logging process anyway
        }
        super().log_trial_start(trial)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # A stopped sweep's running trials never ended, and Ray would wait for their logging
        # processes until its upload timeout (30 min): tell them to finish first.
        for trial in list(self._trial_logging_futures):
            self._signal_logging_actor_stop(trial)
        super().on_experiment_end(trials, **info)


def log_wandb_evaluation(space: SweepSpace, folder: str, row: dict[str, Any], checkpoint: tune.Checkpoint) -> None:
    """An evaluation `row` on its trial's W&B run: its figures and what it evaluated in the run's
    summary (W&B's runs table), the trial's image grids as the run's files `images/*.png`."""
    run = wandb.init(
        id=row["trial_id"], name=row["trial_name"], resume="allow", reinit="create_new", **init_settings(space, folder)
    )
    try:
        run.summary.update({**evaluation_figures(row), **evaluation_tags(row)})
        write_image_grids(checkpoint, Path(run.dir, "images"))  # run.dir's files are the run's, uploaded at finish
    finally:
        run.finish()
