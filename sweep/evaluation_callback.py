"""`best: each`: a Ray Tune callback that evaluates each trial's best checkpoint as soon as the
trial has finished, while the others train."""

from __future__ import annotations

from typing import Any

import ray
from pyarrow import fs as pafs
from ray import tune

from iwae_model.errors import IWAEError
from iwae_model.files import WriteError

from .evaluation_jobs import EvaluationJob, best_checkpoint, evaluation_job
from .evaluation_registry import IN_THIS_DRIVER, headline
from .folder import read_spec
from .live import LiveView
from .results import merge_trials
from .space import SweepSpace
from .trials import trial_label, trial_row
from .tune_state import trial_result


class EvaluateAsTrialsFinish(tune.Callback):
    """`best: each`: evaluates each trial's best checkpoint once the trial has finished, as a Ray
    task the size of a trial (its CPUs, or one CPU and `eval_gpus`), and writes its rows at once.

    Training comes first: an evaluation starts only while no trial waits for resources, and on
    resources free now (else it would hold a core a trial waits for). What has not started when
    training ends is left to `evaluate_sweep`, which also collects those still running. An error
    here is shown, never raised into Tune (it would fail the trial or the sweep): that
    checkpoint is evaluated again when training ends.

    Tune pickles its callbacks with the sweep, and a resumed sweep runs the restored copy: this
    one keeps only the sweep folder, and reads the space (resources as resumed) from its spec."""

    def __init__(self, folder: str, filesystem: pafs.FileSystem, view: LiveView) -> None:
        self.folder, self.filesystem, self.view = folder, filesystem, view
        self.waiting: list[EvaluationJob] = []  # jobs of finished trials
        self.spec: tuple[SweepSpace, str] | None = None
        self.shown: set[str] = set()  # failures noted: one that repeats at every step is shown once

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "filesystem": self.filesystem, "view": self.view}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["filesystem"], state["view"])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        try:
            self.spec = self.spec or read_spec(self.folder, self.filesystem)
            space, data_dir = self.spec
            result = trial_result(trial)
            if result.checkpoint is None:
                return
            checkpoint = best_checkpoint(result, space.metric)
            if not IN_THIS_DRIVER.of(self.folder, self.filesystem).alike(trial.trial_id, checkpoint, space):
                self.waiting.append(
                    evaluation_job(space, data_dir, trial.trial_id, checkpoint, max(1, int(self.ask()[0])))
                )
        except Exception as error:  # noqa: BLE001 -- see the class's docstring
            self.failed(trials, f"{trial_label(trial)}'s evaluation", error)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        state = IN_THIS_DRIVER.known(self.folder)  # made (its files read) when a trial finished
        if state is None or not (self.waiting or state.running):
            return
        try:
            self.spec = self.spec or read_spec(self.folder, self.filesystem)
            if self.waiting and not any(t.status == "PENDING" for t in trials):
                self.start()
            ready = ray.wait(list(state.running), num_returns=len(state.running), timeout=0)[0]
            if not ready:
                return
            # Collected before anything is written: a write that fails (a full disk) leaves them
            # kept here for `evaluate_sweep`, not ready again at every step.
            for row in state.collect(ready, write=False):
                self.view.note(trials, headline(row))
            # The trials file first: a query reading between the writes sees the trial unevaluated.
            merge_trials(
                [
                    trial_row(trial_result(t), self.spec[0], _STATUS.get(t.status))
                    for t in trials
                    if "epoch" in t.last_result
                ],  # (those that have reported a pass)
                self.folder,
                self.filesystem,
            )
            state.write()
        except WriteError as error:
            self.failed(trials, "writing the results", error)
        except Exception as error:  # noqa: BLE001 -- see the class's docstring
            self.failed(trials, "an evaluation", error)

    def ask(self) -> tuple[float, float]:
        """(CPUs, GPUs) of one evaluation while trials train."""
        resources = self.spec[0].resources
        return (1 if resources.eval_gpus else resources.cpus_per_trial), resources.eval_gpus

    def start(self) -> None:
        """The waiting evaluations that fit in the cluster's free resources."""
        cpus, gpus = self.ask()
        free = ray.available_resources()
        free_cpus, free_gpus = free.get("CPU", 0), free.get("GPU", 0)
        while self.waiting and free_cpus >= cpus and free_gpus >= gpus:
            IN_THIS_DRIVER.of(self.folder, self.filesystem).start(self.waiting.pop(0), cpus, gpus)
            free_cpus, free_gpus = free_cpus - cpus, free_gpus - gpus

    def failed(self, trials: list, what: str, error: Exception) -> None:
        """`what` failed, noted once however often it repeats (an IWAEError by its message alone)."""
        cause = (
            str(error).strip()
            if isinstance(error, IWAEError)
            else f"{type(error).__name__}: {str(error).strip()[:300]}"
        )
        text = f"{what} failed: {cause}; it is tried again when training ends"
        if text not in self.shown:
            self.shown.add(text)
            self.view.note(trials, text)


# A trial's status in trials.parquet while the sweep runs (a terminated one's says how it ended).
_STATUS = {"RUNNING": "running", "PENDING": "waiting", "PAUSED": "paused", "ERROR": "failed"}
