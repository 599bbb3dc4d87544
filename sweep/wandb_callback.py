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
from ray.air.integrations.wandb import WandbLoggerCallback, _WandbLoggingActor
from ray.tune.result import AUTO_RESULT_KEYS

from .space import SweepSpace
from .trackers import (
    FOLDER_TAG,
    NotedFailures,
    check_wandb_login,
    evaluation_figures,
    evaluation_tags,
    run_params,
    wandb_dir,
    write_image_grids,
)
from .trials import trial_label

# Ray's bookkeeping (timings, host, pid, ...) kept out of the run, which shows what the trial reports.
RAY_BOOKKEEPING = sorted({*AUTO_RESULT_KEYS, *WandbLoggerCallback.AUTO_CONFIG_KEYS} - {TRAINING_ITERATION})


def init_settings(space: SweepSpace, folder: str) -> dict[str, Any]:
    """`wandb.init` keywords every run of sweep `folder` shares: its project and group (the sweep's
    name), where its files go, and W&B's variables as this driver has them (the logging processes
    are Ray workers, which see only the environment Ray started with, and only WANDB_API_KEY of it)."""
    env = os.environ.get
    return {
        "project": space.name,
        "group": space.name,
        "dir": wandb_dir(folder),
        **({"mode": env("WANDB_MODE")} if env("WANDB_MODE") else {}),
        **({"entity": env("WANDB_ENTITY")} if env("WANDB_ENTITY") else {}),
        # Silent: the live table, not W&B's banner per trial; no console capture of the driver.
        "settings": {
            "silent": True,
            "console": "off",
            **({"base_url": env("WANDB_BASE_URL")} if env("WANDB_BASE_URL") else {}),
        },
    }


class SweepWandbLoggingActor(_WandbLoggingActor):
    """Ray's process that logs one trial to W&B, waiting at the end until W&B's service has written
    the run: Ray kills the process as soon as `run` returns, before the exit handler that would
    wait, and a run's records were lost that way (its .wandb file left empty)."""

    def run(self) -> None:
        super().run()
        self._wandb.teardown()


class SweepWandbCallback(NotedFailures, WandbLoggerCallback):
    """Ray Tune's W&B logger, each trial a W&B run whose id is its Ray trial id (so a resumed sweep
    continues it), named by its label, its parameters as `run_params`, its metrics as the trial
    reports them without Ray's bookkeeping, at step `training_iteration`. W&B failing in this
    driver is noted, never raised (NotedFailures); in Ray's logging processes (one per trial), it
    shows in their logs and the sweep goes on. Tune pickles its callbacks with the sweep and a resumed sweep runs
    that copy: W&B's settings are read again in `setup`, as the resuming driver has them."""

    _logger_actor_cls = SweepWandbLoggingActor  # Ray's hook for its logging process's class

    def __init__(self, space: SweepSpace, folder: str) -> None:
        self.space, self.folder = space, folder
        self.where = "W&B"
        super().__init__(excludes=RAY_BOOKKEEPING, **init_settings(space, folder))

    def setup(self, *args: Any, **kwargs: Any) -> None:
        self._failed = None
        self.shared = init_settings(self.space, self.folder)
        self._guarded("the sweep's project", super().setup, *args, **kwargs)

    def log_trial_start(self, trial: Any) -> None:
        # Ray passes `self.kwargs` to wandb.init last, over its own per-trial choices.
        self.kwargs = {
            **self.shared,
            "name": trial_label(trial),
            "config": {**run_params(self.space, trial.config), FOLDER_TAG: self.folder},
            "resume": "allow",
            "reinit": "finish_previous",  # Ray's `True` is deprecated; one run per logging process anyway
        }
        self._guarded(f"{trial_label(trial)}'s run", super().log_trial_start, trial)

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        # Without Ray's copy of the trial's config, which Ray's logging process would add to the
        # run's config at every pass (its `excludes` leave out metrics only).
        result = {key: value for key, value in result.items() if key != "config"}
        self._guarded(f"{trial_label(trial)}'s pass", super().log_trial_result, iteration, trial, result)

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        if trial in self._trial_queues:
            self._guarded(f"{trial_label(trial)}'s end", super().log_trial_end, trial, failed)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # A stopped sweep's running trials never ended, and Ray would wait for their logging
        # processes until its upload timeout (30 min): tell them to finish first.
        def end() -> None:
            for trial in list(self._trial_logging_futures):
                self._signal_logging_actor_stop(trial)
            super(SweepWandbCallback, self).on_experiment_end(trials, **info)

        self._guarded("the sweep's end", end)


def log_wandb_evaluation(space: SweepSpace, folder: str, row: dict[str, Any], checkpoint: tune.Checkpoint) -> None:
    """An evaluation `row` on its trial's W&B run: its figures and what it evaluated in the run's
    summary (W&B's runs table), the trial's image grids as the run's files `images/*.png`."""
    check_wandb_login("W&B")
    run = wandb.init(
        id=row["trial_id"], name=row["trial_name"], resume="allow", reinit="create_new", **init_settings(space, folder)
    )
    try:
        run.summary.update({**evaluation_figures(row), **evaluation_tags(row)})
        write_image_grids(checkpoint, Path(run.dir, "images"))  # run.dir's files are the run's, uploaded at finish
    finally:
        run.finish()
