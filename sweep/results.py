"""The sweep's results as Parquet, in three files with versioned schemas: `results.parquet`, one
row per evaluated checkpoint, `per_image.parquet`, one row per checkpoint and test image, and
`trials.parquet`, one row per trial.

Load them without this package:

    import pyarrow.parquet as pq
    table = pq.read_table("SWEEP_DIR/results/results.parquet")   # or .to_pandas()

Their columns, each with its type and what it holds: sweep/columns.py and docs/columns.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

import iwae_model
from iwae_model import TrainConfig
from iwae_model.ais import AISComparison
from iwae_model.errors import IWAEError
from iwae_model.evaluation import Evaluation, comparable_to_papers
from iwae_model.plugins import sources_of

from . import columns
from .storage import filesystem_and_path, write_whole

RESULTS_FILE = columns.RESULTS.file
PER_IMAGE_FILE = columns.PER_IMAGE.file
TRIALS_FILE = columns.TRIALS.file
TRIALS_SCHEMA = columns.TRIALS.arrow()
PER_IMAGE_SCHEMA = columns.PER_IMAGE.arrow()


@dataclass
class EvaluationRecord:
    """What a results row says of one evaluated checkpoint besides the evaluation's figures."""

    sweep: str
    trial_id: str
    trial_name: str  # the configuration's label (sweep.trials.trial_name)
    checkpoint_uri: str
    evaluation_id: str
    config: TrainConfig
    state: dict[str, Any]  # the checkpoint's
    nodes: list[dict]  # the trial's node record (the trainable's nodes.json)
    eval_node: dict[str, Any]  # the Ray node of the evaluation (cluster.this_node: node_id, node_ip, hostname)
    metric: str  # what ranked the trials and checkpoints: valid_ll or valid_bound
    searched: list[str]  # the keys a search drew ([] for a grid)


def results_row(record: EvaluationRecord, result: Evaluation, ais: AISComparison | None) -> dict[str, Any]:
    """The results.parquet row (columns.RESULTS) of one evaluated checkpoint, with its AIS figures if any."""
    config, state, nodes = record.config, record.state, record.nodes
    last = state["history"][-1]
    snr_row = next((row for row in reversed(state["history"]) if row.get("snr")), None)
    snr = snr_row["snr"] if snr_row else {}
    return {
        "sweep": record.sweep,
        "trial_id": record.trial_id,
        "trial_name": record.trial_name,
        "objective": config.objective,
        "m": config.m,
        "k": config.k,
        **dict(config.params),
        "layers": config.layers,
        "estimator": config.estimator,
        "seed": config.seed,
        "passes": config.passes,
        "schedule": config.schedule,
        "dataset": config.dataset,
        "binarization": result.binarization,
        "train_images": config.train_images,
        "data_files": json.dumps(result.data_files, sort_keys=True),
        "eval_k": result.k,
        "eval_images": result.images,
        "comparable_to_papers": comparable_to_papers(result, config),
        "test_nll": result.nll,
        "test_nll_se": result.nll_se,
        "test_bound": result.test_bound,
        "test_bound_name": result.test_bound_name,
        "train_bound": last["train_bound"],
        "valid_bound": last["valid_bound"],
        "active_units": result.active_units,
        "epochs": state["epoch"],
        "train_seconds": state["train_seconds"],
        "eval_seconds": result.seconds,
        "device": result.device,
        "eval_float32": result.float32,
        "eval_gpu_name": result.gpu_name,
        "eval_gpu_capability": result.gpu_capability,
        "checkpoint_uri": record.checkpoint_uri,
        "project_version": iwae_model.__version__,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0),
        "config": json.dumps(config.to_dict()),
        "plugins": json.dumps(plugins) if (plugins := sources_of(config)) else None,
        "ess_mean": result.ess_mean,
        "ess_median": result.ess_median,
        "pareto_k_above_0_7": result.pareto_k_above,
        "pareto_k_max": result.pareto_k_max,
        "noise": result.noise,
        "evaluation_id": record.evaluation_id,
        "snr_epoch": snr_row["epoch"] if snr_row else None,
        **{
            f"snr_{name}": snr.get(name)
            for name in ("encoder_mean", "encoder_median", "decoder_mean", "decoder_median")
        },
        "snr": json.dumps(snr) if snr else None,
        "sweep_stage": 2 if config.init_label or config.init_from else 1,
        "parent_trial_name": config.init_label,
        "parent_checkpoint_uri": config.init_from,
        **{
            f"train_{key}": nodes[-1].get(key) if nodes else None
            for key in ("device", "node_id", "node_ip", "hostname", "float32", "gpu_name", "gpu_capability")
        },
        "train_nodes": json.dumps(nodes) if nodes else None,
        "generator_reseeded_at": next(
            (row["epoch"] for row in state["history"] if row.get("generator_reseeded")), None
        ),
        **{f"eval_{key}": value for key, value in record.eval_node.items()},
        **search_columns(config, record.metric, record.searched),
        "rank_metric_value": last[record.metric],
        **ais_columns(ais),
    }


# An evaluation's figures in TensorBoard (evaluation_registry): these results columns as scalars
# (those null or NaN left out: AIS off, k̂ for k < 25), these per-image columns as histograms.
EVALUATION_SCALARS = (
    "test_nll",
    "test_bound",
    "ess_mean",
    "ess_median",
    "pareto_k_above_0_7",
    "pareto_k_max",
    "ais_nll",
    "ais_is_nll",
    "ais_minus_is",
    "ais_acceptance",
)
PER_IMAGE_HISTOGRAMS = ("nll", "ess", "pareto_k", "ais_nll")


def ais_columns(ais: AISComparison | None) -> dict[str, Any]:
    """The ais_* columns of a results row: AISComparison's figures (all None: AIS off)."""
    names = [f.name for f in dataclasses.fields(AISComparison) if f.name != "log_likelihood"]
    figures = ais.summary() if ais else dict.fromkeys(names)
    return {name if name.startswith("ais_") else f"ais_{name}": figures[name] for name in names}


def search_columns(config: TrainConfig, metric: str, searched: list[str]) -> dict[str, Any]:
    """rank_metric, rank_metric_k and searched (the drawn values as JSON, null in a grid)."""
    return {
        "rank_metric": metric,
        "rank_metric_k": config.valid_ll_k if metric == "valid_ll" else None,
        "searched": json.dumps({key: getattr(config, key) for key in searched}) if searched else None,
    }


def per_image_part(record: EvaluationRecord, result: Evaluation, ais: AISComparison | None) -> dict[str, Any]:
    """The per_image.parquet columns (PER_IMAGE_SCHEMA) of one evaluated checkpoint; ais_nll NaN
    (written as null) where AIS did not run."""
    ais_nll = np.full(result.images, np.nan)
    if ais is not None:
        ais_nll[: ais.images] = -ais.log_likelihood
    return {
        "evaluation_id": record.evaluation_id,
        "trial_id": record.trial_id,
        "trial_name": record.trial_name,
        "checkpoint_uri": record.checkpoint_uri,
        "image": result.per_image["image"],
        "nll": -result.per_image["log_likelihood"],
        "ess": result.per_image["ess"],
        "pareto_k": result.per_image["pareto_k"],
        "ais_nll": ais_nll,
    }


class ResultsError(IWAEError, ValueError):
    """A file that is not iwae-sweep results this version reads; the message names it and the fix."""


Evaluated = dict[str, tuple[dict[str, Any], dict[str, Any]]]  # {trial id: (results row, per-image columns)}


def read_evaluated(folder: str, filesystem: pafs.FileSystem) -> Evaluated:
    """The checkpoints already evaluated in sweep `folder`, as its results and per-image files
    hold them; {} where there are none, or those of another schema version (they are evaluated
    again). A file that cannot be read raises ResultsError (an object store's error, OSError,
    passes through: another try may read it)."""
    paths = [f"{folder}/{RESULTS_FILE}", f"{folder}/{PER_IMAGE_FILE}"]
    try:
        rows, per_image = (pq.read_table(path, filesystem=filesystem) for path in paths)
    except FileNotFoundError:
        return {}
    except pa.ArrowInvalid as error:
        raise ResultsError(
            f"{folder}/results: {_first_line(error)}; delete {' and '.join(paths)} to evaluate "
            f"the sweep's checkpoints again"
        ) from None
    files = ((paths[0], rows, columns.RESULTS), (paths[1], per_image, columns.PER_IMAGE))
    if any(_version(table, schema.version_key) != str(schema.version) for _, table, schema in files):
        return {}
    for path, table, schema in files:
        _require_columns(path, table, schema)
    images = per_image.to_pandas().groupby(["trial_id", "evaluation_id"])
    evaluated = {}
    for row in rows.to_pylist():
        key = (row["trial_id"], row["evaluation_id"])
        if key in images.groups:
            part = images.get_group(key)
            evaluated[row["trial_id"]] = (
                row,
                {
                    name: part[name].to_numpy() if name in _PER_IMAGE_ARRAYS else part[name].iloc[0]
                    for name in PER_IMAGE_SCHEMA.names
                },
            )
    return evaluated


_PER_IMAGE_ARRAYS = ("image", "nll", "ess", "pareto_k", "ais_nll")
_NULL_FOR_NAN = ("ais_nll",)  # NaN there means "not run": null in the file, NaN again when read


def _version(table: pa.Table, key: str) -> str | None:
    found = (table.schema.metadata or {}).get(key.encode())
    return found.decode(errors="replace") if found is not None else None


def write_evaluated(folder: str, filesystem: pafs.FileSystem, evaluated: Evaluated) -> list[dict[str, Any]]:
    """Sweep `folder`'s results and per-image files, holding `evaluated`; returns the rows by
    trial name. The per-image file first: each results row names the evaluation its per-image
    rows carry, so a crash between the two writes leaves no row without its images."""
    ordered = sorted(evaluated.values(), key=lambda pair: pair[0]["trial_name"])
    write_table(per_image_table([part for _, part in ordered]), f"{folder}/{PER_IMAGE_FILE}", filesystem)
    rows = [row for row, _ in ordered]
    write_results(rows, f"{folder}/{RESULTS_FILE}", filesystem)
    return rows


def merge_trials(rows: list[dict[str, Any]], folder: str, filesystem: pafs.FileSystem) -> None:
    """`rows` into sweep `folder`'s trials file, replacing the rows of the same trials."""
    try:
        merged = {
            row["trial_id"]: row for row in pq.read_table(f"{folder}/{TRIALS_FILE}", filesystem=filesystem).to_pylist()
        }
    except (FileNotFoundError, pa.ArrowInvalid):  # none yet, or damaged: the rows of this stage's trials
        merged = {}
    merged.update({row["trial_id"]: row for row in rows})
    write_trials(list(merged.values()), f"{folder}/{TRIALS_FILE}", filesystem)


def write_results(rows: list[dict[str, Any]], path: str, filesystem: pafs.FileSystem) -> None:
    write_table(pa.Table.from_pylist(rows, schema=columns.RESULTS.arrow()), path, filesystem)


def write_trials(rows: list[dict[str, Any]], path: str, filesystem: pafs.FileSystem) -> None:
    write_table(pa.Table.from_pylist(rows, schema=TRIALS_SCHEMA), path, filesystem)


def per_image_table(parts: list[dict[str, Any]]) -> pa.Table:
    """One table from each checkpoint's per-image columns (constants broadcast to every image)."""
    tables = []
    for part in parts:
        images = len(part["image"])
        tables.append(
            pa.table(
                {
                    name: pa.array(
                        part[name], from_pandas=name in _NULL_FOR_NAN, type=PER_IMAGE_SCHEMA.field(name).type
                    )
                    if isinstance(part[name], np.ndarray)
                    else [part[name]] * images
                    for name in PER_IMAGE_SCHEMA.names
                },
                schema=PER_IMAGE_SCHEMA,
            )
        )
    return pa.concat_tables(tables)


def write_table(table: pa.Table, path: str, filesystem: pafs.FileSystem) -> None:
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    write_whole(buffer.getvalue(), path, filesystem)


def read_results(location: str) -> pa.Table:
    """A sweep folder's results, or a Parquet file, local or on object storage."""
    return read_file(location, columns.RESULTS)


def read_trials(location: str) -> pa.Table:
    """A sweep folder's table of trials (or that Parquet file), local or on object storage."""
    return read_file(location, columns.TRIALS)


def read_per_image(location: str) -> pa.Table:
    """A sweep folder's per-image results (or that Parquet file), local or on object storage."""
    return read_file(location, columns.PER_IMAGE)


def read_file(location: str, schema: columns.Schema) -> pa.Table:
    """`schema`'s file in sweep folder `location`, or the Parquet file `location`, checked to be it:
    readable, of this schema version, with its columns; a ResultsError naming the fix if not."""
    filesystem, path = filesystem_and_path(location)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        path = f"{path.rstrip('/')}/{schema.file}"
        info = filesystem.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise ResultsError(
            f"{location}: no results there (expected a Parquet file or a sweep folder "
            f"holding {schema.file}; run python -m sweep.evaluate on the sweep first)"
        )
    try:
        table = pq.read_table(path, filesystem=filesystem)
        _check_readable(table)
    except (pa.ArrowException, OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError too
        raise ResultsError(
            f"{location}: not a readable Parquet file ({_first_line(error)}); re-create it with "
            f"python -m sweep.evaluate SWEEP_DIR"
        ) from None
    found = _version(table, schema.version_key)
    if found is None:
        raise ResultsError(
            f"{location}: a Parquet file, but not iwae-sweep {schema.file} (no {schema.version_key} "
            f"in its metadata); pass SWEEP_DIR/{schema.file} or the sweep folder"
        )
    if found != str(schema.version):
        raise ResultsError(
            f"{location}: results schema version {found}, this version "
            f"reads {schema.version}: re-create them with python -m sweep.evaluate SWEEP_DIR, or read them "
            f"with the iwae-sweep version that wrote them"
        )
    _require_columns(location, table, schema)
    return table


def _check_readable(table: pa.Table) -> None:
    """Raise if a damaged byte that Parquet's reader let through would fail a reader later: in
    the footer's column names, in a string column (invalid UTF-8), or in a config's JSON."""
    table.validate(full=True)
    if "config" in table.schema.names:
        for config in table.column("config").to_pylist():
            if config is not None:
                json.loads(config)


def _require_columns(location: str, table: pa.Table, schema: columns.Schema) -> None:
    missing = [c.name for c in schema.columns if c.name not in table.schema.names and not c.optional]
    if missing:
        raise ResultsError(
            f"{location}: schema version {schema.version} but columns {missing} are missing; the file "
            f"was edited or damaged: re-create it with python -m sweep.evaluate SWEEP_DIR"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
