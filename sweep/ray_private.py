"""Ray's private APIs that iwae-sweep relies on, in one place. Each was checked against Ray 2.60.0,
the pinned version; tests/test_private_apis.py fails on a Ray where one is gone or has changed,
before a user's sweep does."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray._common.utils import get_ray_address_file
from ray._private import ray_constants, services
from ray._private.authentication import authentication_token_setup as _authentication
from ray.tune.logger import TBXLoggerCallback

CHECKED_WITH = "2.60.0"


def single_machine_addressing() -> None:
    """A Ray started by this process uses 127.0.0.1: this process read the loopback switch's
    variable when it imported ray, so setting the variable alone is too late here."""
    ray_constants.ENABLE_RAY_CLUSTER = False


def address_from_environment(address: str) -> str:
    """The `host:port` that `address` ("auto": the cluster `ray start` last made here) resolves to."""
    return services.get_ray_address_from_environment(address, None) or ""


def address_file() -> Path:
    """`ray start`'s record of the current cluster (what `ray stop` removes)."""
    return Path(get_ray_address_file(None))


def kept_checkpoint_results(trial: Any) -> list:
    """A running Ray Tune trial's kept checkpoints with their metrics (Tune builds a Result's
    `best_checkpoints` from these; a Trial has no public accessor)."""
    return trial.run_metadata.checkpoint_manager.best_checkpoint_results


def quiet_checkpoint_logging() -> None:
    """Ray logs "Checkpoint successfully created" at INFO after every pass: noise in the live view."""
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)


def quiet_default_token_notice() -> None:
    """Ray warns on every start of a local cluster that it turned token authentication on, its
    default: noise before the live view. Only that notice is dropped; the setting stays, and
    the warning that authentication is off is kept. (RAY_AUTH_MODE=token would silence it too,
    but Ray reads the variable when it is imported: too late here.)"""
    logging.getLogger(_authentication.__name__).addFilter(_not_the_default_token_notice)  # once: the same filter


def _not_the_default_token_notice(record: logging.LogRecord) -> bool:
    return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


class TrialCurves(TBXLoggerCallback):
    """Ray Tune's TensorBoard logger (a writer per trial, in the trial's folder, synced as Tune
    syncs it) writing only the curves `tags` picks from each result, at its pass: not every key of
    the result under `ray/tune/` (Ray's bookkeeping among them: done, should_checkpoint, ...), and
    none of Ray's HParams rows (the sweep writes its own, `sweep.hparams`)."""

    def __init__(self, tags: Callable[[dict], dict[str, float]]):
        super().__init__()
        self._tags = tags

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        if trial not in self._trial_writer:
            self.log_trial_start(trial)
        writer = self._trial_writer[trial]
        for tag, value in self._tags(result).items():
            writer.add_scalar(tag, value, global_step=result["epoch"])
        writer.flush()

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        if trial in self._trial_writer:
            self._trial_writer.pop(trial).close()
            self._trial_result.pop(trial, None)
