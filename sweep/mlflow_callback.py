"""Ray Tune's `MLflowLoggerCallback` as a sweep uses it (sweep.trackers). A module of its own:
Ray's imports MLflow, which costs every command a second of start-up when no tracker is asked for."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ray.air.constants import TRAINING_ITERATION
from ray.air.integrations.mlflow import MLflowLoggerCallback

from .space import SweepSpace
from .trackers import (
    EMBEDDED_DIR,
    FOLDER_TAG,
    TRIAL_ID_TAG,
    NotedFailures,
    embedded,
    find_run,
    run_params,
    tracking_uri,
)
from .trials import trial_label


class SweepMLflowCallback(NotedFailures, MLflowLoggerCallback):
    """Ray Tune's MLflow logger, with the sweep's experiment (its artifacts in the sweep folder when
    the store is embedded), a trial's parameters as `run_params`, its metrics in one batch per
    pass, and a resumed trial continuing its run: found by its Ray trial id, each pass logged once.

    MLflow failing (a server down) is noted, never raised (NotedFailures). Tune pickles its
    callbacks with the sweep and a resumed sweep runs that copy, so it keeps only settings; `setup`
    makes the rest anew."""

    def __init__(self, space: SweepSpace, folder: str) -> None:
        super().__init__(tracking_uri(space.tracker, folder), experiment_name=space.name)
        self.space, self.folder = space, folder
        self.embedded = embedded(space.tracker)
        self.where = f"MLflow at {self.tracking_uri}"

    def setup(self, *args: Any, **kwargs: Any) -> None:
        self._logged: dict[Any, int] = {}  # trial: the last step its run has
        self._failed: Exception | None = None  # MLflow could not be set up: nothing is logged
        self._guarded("the sweep's experiment", self._setup, *args, **kwargs)

    def log_trial_start(self, trial: Any) -> None:
        self._guarded(f"{trial_label(trial)}'s run", self._start, trial)

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        self._guarded(f"{trial_label(trial)}'s pass", self._result, trial, result)

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        if trial in self._trial_runs:
            self._guarded(f"{trial_label(trial)}'s end", super().log_trial_end, trial, failed)

    def _setup(self, *args: Any, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking_uri)
        if self.embedded:
            # Made here with its artifacts beside the database: MLflow's default is ./mlruns in the cwd.
            store = Path(self.folder, EMBEDDED_DIR)
            store.mkdir(parents=True, exist_ok=True)
            if client.get_experiment_by_name(self.experiment_name) is None:
                client.create_experiment(self.experiment_name, artifact_location=(store / "artifacts").as_uri())
        super().setup(*args, **kwargs)

    def _start(self, trial: Any) -> None:
        from mlflow.entities import Param, RunStatus

        client = self.mlflow_util._get_client()
        if trial in self._trial_runs:  # retried after a failure, which ended its run FAILED
            client.update_run(self._trial_runs[trial], status=RunStatus.to_string(RunStatus.RUNNING))
            return
        run = find_run(client, self.mlflow_util.experiment_id, trial.trial_id, self.folder)
        if run is None:
            tags = {**self.tags, TRIAL_ID_TAG: trial.trial_id, FOLDER_TAG: self.folder}
            run = client.create_run(self.mlflow_util.experiment_id, tags=tags, run_name=trial_label(trial))
        else:  # a resumed sweep: the same run goes on, from the step after its last
            client.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            history = client.get_metric_history(run.info.run_id, TRAINING_ITERATION)
            self._logged[trial] = max((metric.step for metric in history), default=0)
        self._trial_runs[trial] = run.info.run_id
        params = run_params(self.space, trial.config)
        # Logged once per run: MLflow refuses a parameter logged again (a resumed trial's).
        known = client.get_run(run.info.run_id).data.params
        client.log_batch(
            run.info.run_id, params=[Param(key, value) for key, value in params.items() if key not in known]
        )

    def _result(self, trial: Any, result: dict) -> None:
        from mlflow.entities import Metric

        step = result[TRAINING_ITERATION]
        if step <= self._logged.get(trial, 0):  # a pass a killed driver had logged, trained again
            return
        metrics = self.mlflow_util._parse_dict(result)  # numbers only: Ray's copy of the config is left out
        now = int(result.get("timestamp", 0) * 1000)
        self.mlflow_util._get_client().log_batch(
            self._trial_runs[trial],
            metrics=[Metric(key, value, now, step) for key, value in metrics.items() if math.isfinite(value)],
        )
        self._logged[trial] = step
