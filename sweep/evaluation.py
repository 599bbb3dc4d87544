"""The sweep's k-sample evaluation of its best checkpoints, as Ray tasks.

With `best: each`, a trial's best checkpoint is evaluated once the trial has finished, on
resources no trial is waiting for, while the others train (`EvaluateAsTrialsFinish`); its
Parquet rows appear at once, so `sweep.query` shows it. When training ends, `evaluate_sweep`
evaluates what is left: every checkpoint of `best: top`, those no resources were free for, and
any that a killed driver did not finish. A
checkpoint already in the results with the same k and images is kept, so a resumed sweep evaluates
nothing twice. The files are rewritten whole as each result arrives: a crash loses at most the
evaluations in progress.
"""

from __future__ import annotations

import sys

import ray
from pyarrow import fs as pafs
from ray import tune
from tqdm import tqdm

from iwae_model.errors import IWAEError

from .evaluation_jobs import evaluation_job, same_evaluation, select_checkpoints
from .evaluation_registry import IN_THIS_DRIVER, Evaluations
from .hparams import write_hparams
from .results import RESULTS_FILE, TRIALS_FILE, write_evaluated, write_trials
from .space import SweepSpace
from .trials import trial_rows


class NothingToEvaluate(IWAEError, RuntimeError):
    pass


def evaluate_sweep(
    grids: list[list[tune.Result]],
    folder: str,
    filesystem: pafs.FileSystem,
    space: SweepSpace,
    data_dir: str,
    eval_gpus: float | None = None,
    eval_actors: int | None = None,
    keep: bool = True,
) -> tuple[str, list[dict]]:
    """Evaluate the selected checkpoints of every stage's grid, `eval_actors` at a time; write the
    Parquet files and TensorBoard's HParams into the sweep `folder` (on `filesystem`); return the
    results path and rows. With `keep`, a checkpoint already evaluated alike (or being evaluated:
    EvaluateAsTrialsFinish) is kept and each new result is written as it arrives; without, every
    one is evaluated anew and the old files replaced when all are done."""
    gpus = space.resources.eval_gpus if eval_gpus is None else eval_gpus
    at_once = space.resources.eval_actors if eval_actors is None else eval_actors
    selected = select_checkpoints(grids, space)
    if not selected:
        raise NothingToEvaluate(f"{folder}: no finished trial with a checkpoint to evaluate")
    state = IN_THIS_DRIVER.forget(folder)
    if not keep:
        state = Evaluations(folder, filesystem, read=False)
    elif state is None:
        state = Evaluations(folder, filesystem)
    chosen = dict(selected)
    state.done = {
        trial_id: done
        for trial_id, done in state.done.items()  # not those no longer selected
        if trial_id in chosen and same_evaluation(done[0], chosen[trial_id], space)
    }
    todo = [(trial_id, checkpoint) for trial_id, checkpoint in selected if not state.alike(trial_id, checkpoint, space)]
    images = space.evaluation.images or "all"
    if state.done:
        print(
            f"{len(state.done)} of {len(selected)} checkpoint(s) already evaluated with k={space.evaluation.k} on "
            f"{images} test images (as their trials finished, or before a resume): kept",
            file=sys.stderr,
        )
    if state.running:
        print(f"{len(state.running)} evaluation(s) started as their trials finished: still running", file=sys.stderr)
    at_once = min(at_once, max(1, len(todo)))
    # On CPU the evaluations share the cluster's cores (no more than one node has); on GPU one core
    # each feeds its GPU. Beside evaluations still running at a trial's size, the rest take that
    # size too, as many at a time as the cores hold: a wider one would leave cores idle until they end.
    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    node_cpus = max(node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"])
    cpus = 1 if gpus else int(max(1, min(node_cpus, cluster_cpus // at_once)))
    if state.running and not gpus:
        cpus = max(1, int(space.resources.cpus_per_trial))
        at_once = max(at_once, int(cluster_cpus // cpus))
    if todo:
        print(
            f"Evaluating {len(todo)} checkpoint(s) with k={space.evaluation.k} on {images} test images "
            f"({at_once} at a time, {gpus or 0} GPU and {cpus} CPU each)",
            file=sys.stderr,
        )
    waiting = [evaluation_job(space, data_dir, trial_id, checkpoint, cpus) for trial_id, checkpoint in todo]
    mine: set[ray.ObjectRef] = set()
    with tqdm(
        total=len(todo) + len(state.running), desc="k-sample evaluation", unit="checkpoint", file=sys.stderr
    ) as progress:
        while waiting or state.running:
            while waiting and len(mine & set(state.running)) < at_once:
                mine.add(state.start(waiting.pop(0), cpus, gpus))
            ready, _ = ray.wait(list(state.running), num_returns=1)
            state.collect(ready, write=keep)  # without keep, the old files stay whole until all are done
            progress.update(len(ready))
    state.write_events()  # without keep, all of them; with, those a full disk kept from being written
    rows = write_evaluated(folder, filesystem, state.done)
    write_trials(trial_rows(grids, space), f"{folder}/{TRIALS_FILE}", filesystem)
    write_hparams(folder, filesystem, grids, rows)
    return f"{folder}/{RESULTS_FILE}", rows
