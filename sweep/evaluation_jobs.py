"""Which checkpoints a sweep evaluates (the best of each trial by the ranking metric, never a test
figure) and the job each becomes for the evaluation task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray import tune

from iwae_model.datasets import DATASETS

from .space import AISSettings, SweepSpace
from .storage import is_local
from .trials import score


def checkpoint_uri(checkpoint: tune.Checkpoint) -> str:
    filesystem = checkpoint.filesystem
    return checkpoint.path if is_local(filesystem) else f"{filesystem.type_name}://{checkpoint.path}"


def best_checkpoint(result: tune.Result, metric: str) -> tune.Checkpoint:
    return result.get_best_checkpoint(metric, "max") or result.checkpoint


def select_checkpoints(grids: list[list[tune.Result]], space: SweepSpace) -> list[tuple[str, tune.Checkpoint]]:
    """(trial id, checkpoint) pairs: the best checkpoint of every finished trial by the space's
    metric (`best: each`), or of the `top` trials best by it (`best: top`). Never a test figure."""
    evaluation, metric = space.evaluation, space.metric
    chosen = []
    for result in (result for grid in grids for result in grid):
        if result.error is not None or result.checkpoint is None:
            continue
        best = best_checkpoint(result, metric)
        chosen.append((score(result, metric), result.metrics["trial_id"], best))
    chosen.sort(key=lambda item: item[0], reverse=True)
    if evaluation.best == "top":
        chosen = chosen[: evaluation.top]
    return [(trial_id, checkpoint) for _, trial_id, checkpoint in chosen]


def same_evaluation(row: dict[str, Any], checkpoint: tune.Checkpoint, space: SweepSpace) -> bool:
    """Whether results `row` is `checkpoint` evaluated as `space` asks: k, test images and the AIS
    settings (AIS off, or its steps, chains, start and images). A row is one evaluation, IS and
    AIS together under one evaluation id, so other AIS settings evaluate the checkpoint anew."""
    test_images = DATASETS[row["dataset"]].splits[2] if row["dataset"] in DATASETS else 0
    images = min(space.evaluation.images or test_images, test_images)
    return (row["checkpoint_uri"], row["eval_k"], row["eval_images"], *ais_settings(row)) == (
        checkpoint_uri(checkpoint),
        space.evaluation.k,
        images,
        *asked_ais(space.evaluation.ais, images),
    )


def ais_settings(row: dict[str, Any]) -> tuple:
    """The AIS settings a results row was evaluated with (Nones: AIS off)."""
    return tuple(row[f"ais_{key}"] for key in ("steps", "chains", "start", "images"))


def asked_ais(ais: AISSettings | None, evaluated: int) -> tuple:
    """`ais_settings` of a row evaluated with `ais` where IS evaluates `evaluated` images."""
    return (None,) * 4 if ais is None else (ais.steps, ais.chains, ais.start, ais.images_of(evaluated))


@dataclass(frozen=True)
class EvaluationJob:
    """One checkpoint's evaluation, as the Ray task takes it."""

    sweep: str
    trial_id: str
    checkpoint: tune.Checkpoint
    uri: str  # the checkpoint where the user finds it (a path, or s3://...)
    k: int
    images: int | None  # the first test images; None: all
    data_dir: str
    threads: int
    metric: str  # the ranking metric the checkpoint was chosen by
    searched: tuple[str, ...]  # a search's drawn keys (for the trial's name)
    ais: AISSettings | None  # AIS after the IS estimate (None: off)
    plugins: tuple[dict[str, str], ...]  # the sweep's (iwae_model.plugins records)


def evaluation_job(
    space: SweepSpace, data_dir: str, trial_id: str, checkpoint: tune.Checkpoint, threads: int
) -> EvaluationJob:
    return EvaluationJob(
        sweep=space.name,
        trial_id=trial_id,
        checkpoint=checkpoint,
        uri=checkpoint_uri(checkpoint),
        k=space.evaluation.k,
        images=space.evaluation.images,
        data_dir=data_dir,
        threads=threads,
        metric=space.metric,
        searched=tuple(sorted(space.search.distributions)) if space.search else (),
        ais=space.evaluation.ais,
        plugins=space.plugins,
    )
