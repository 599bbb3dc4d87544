"""The sweep's results as Parquet, in two files with versioned schemas: `results.parquet`, one
row per evaluated checkpoint, and `per_image.parquet`, one row per checkpoint and test image.

Load them without this package:

    import pyarrow.parquet as pq
    table = pq.read_table("SWEEP_DIR/results/results.parquet")   # or .to_pandas()

results.parquet, schema version 6 (`iwae_sweep.schema_version` in the file's metadata):
  sweep, trial_id, trial_name        the sweep's name; Ray's trial id; the configuration label
  dataset, objective, m, k, beta, layers, estimator, seed, passes, schedule, train_images
                                     the trial's configuration (train_images null: the whole training set)
  binarization                       of the data evaluated on: dynamic, static, threshold, or fixed
                                     (binarized_mnist: the files' bits)
  data_files                         the files the evaluation read, as JSON {file name: SHA-256}
  eval_k, eval_images                importance samples and test images of the NLL estimate
  comparable_to_papers               the dataset's binarization, full training set and schedule, k >= 5000, the
                                     whole test set
  test_nll, test_nll_se              -mean log p(x) over the test images (nats) and its standard error
  test_bound, test_bound_name        the training objective's bound on the same images, e.g. IWAE(K=5)
  train_bound, valid_bound           at the evaluated checkpoint's last pass
  active_units                       per stochastic layer (Burda: var of posterior mean > 0.01)
  epochs, train_seconds              passes trained and wall-clock training seconds at the checkpoint
  eval_seconds, device               the evaluation's wall clock and device
  checkpoint_uri                     where the evaluated checkpoint lies
  project_version, timestamp         iwae-sweep version; UTC time of the evaluation
  config                             the trial's whole iwae_model.TrainConfig as JSON (lr, schedule, ...)
  ess_mean, ess_median               effective sample size of the k importance weights, over test images
  pareto_k_above_0_7, pareto_k_max   share of test images whose PSIS k̂ > 0.7 (NLL estimate unreliable); max k̂
  noise                              the q-noise stream: rows with equal values saw the same noise per image
  evaluation_id                      this checkpoint's evaluation; its per-image rows carry the same id
  snr_epoch                          the pass of the last gradient-SNR measurement (null: none was made)
  snr_encoder_mean, snr_encoder_median, snr_decoder_mean, snr_decoder_median
                                     gradient SNR |mean| / std over parameter components (Rainforth et al.)
  snr                                every SNR figure of that pass as JSON (per stochastic layer for 2 layers)
  sweep_stage                        1, or 2 for a trial of the space's `continue` stage (Burda's Table 2)
  parent_trial_name, parent_checkpoint_uri   a stage-2 trial's parent and the checkpoint it started from
  train_device, train_node_id, train_node_ip, train_hostname
                                     where the evaluated checkpoint was trained: its last run's device (cpu
                                     also where Ray gave a rehearsal node's advertised GPU) and Ray node
  train_nodes                        every run of the trial up to that checkpoint as JSON: node, device, float32,
                                     gpu_name, gpu_capability, Ray GPU ids, gpus_advertised_only, started_at (Unix
                                     time), first_epoch (a restart after a crash or node loss adds one),
                                     generator_reseeded (that run resumed on another device type)
  eval_node_id, eval_node_ip, eval_hostname   the Ray node that ran the evaluation
  eval_float32, train_float32        float32 precision of matmuls and convolutions there: ieee (no TF32)
  eval_gpu_name, eval_gpu_capability, train_gpu_name, train_gpu_capability
                                     on CUDA, the GPU's name and compute capability (null on CPU)
  generator_reseeded_at              the first pass trained after a resume on another device type (its
                                     generator seeded from (seed, step)): from it on the run is not
                                     bit-identical to one that never moved; null: never

  rank_metric, rank_metric_k, rank_metric_value
                                     what ranked the trials and checkpoints (never a test figure):
                                     valid_ll, an importance-sampled log-likelihood on the validation
                                     images with k = rank_metric_k, where trials differ in objective,
                                     K or M and are ranked against each other; else valid_bound; its
                                     value at the evaluated checkpoint
  searched                           a search's drawn values as JSON {key: value} (null: a grid)

  AIS, with the space's `evaluation.ais` (docs/ais.md); every ais_ column null where it is off:
  ais_steps, ais_chains, ais_start, ais_leapfrog   annealing distributions, chains per image, where chains
                                     start (encoder or prior), leapfrog steps per HMC transition
  ais_images                         the first test images AIS ran on (at most eval_images)
  ais_nll, ais_nll_se                -mean AIS log p(x) over those images (nats) and its standard error
  ais_is_nll, ais_is_nll_se          the IS estimate (test_nll's) on the same images and its standard error
  ais_minus_is, ais_minus_is_se      paired AIS - IS in log p(x) on those images, mean and SE over images
                                     (> 0: the IS estimate falls at least about this far below log p(x))
  ais_acceptance                     mean HMC acceptance probability (about 0.65 once step sizes adapted)
  ais_log_weight_sd_median           median over images of the chains' log-weight SD (nats)
  ais_seconds                        AIS's wall clock (eval_seconds is the IS evaluation's)

trials.parquet, schema version 1 (`iwae_sweep.trials_schema_version`): one row per trial, evaluated
or not (a search's analyses need every trial, `best: top` evaluates a few)
  trial_id, trial_name, status       status: finished, not finished (stopped early by ASHA), failed, or
                                     while the sweep runs, running, waiting (to resume) or paused
  epochs                             passes trained
  searched                           the values a search drew, as JSON (null: a grid)
  rank_metric, rank_metric_k, rank_metric_value   as above; the value is the trial's best kept checkpoint's

per_image.parquet, schema version 2 (`iwae_sweep.per_image_schema_version`):
  evaluation_id, trial_id, trial_name, checkpoint_uri   which evaluation of which checkpoint
  image                              index into the fixed-binarised test set
  nll, ess, pareto_k                 -log p(x) estimate (nats), effective sample size, PSIS k̂ (NaN for k < 25)
  ais_nll                            -log p(x) by AIS (nats); null beyond the first ais_images images, or AIS off
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import uuid
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
from iwae_model.evaluation import Evaluation
from iwae_model.files import write_atomically

from .storage import TEMP_PREFIX, filesystem_and_path, is_local

SCHEMA_VERSION = 6
RESULTS_FILE = "results/results.parquet"
PER_IMAGE_FILE = "results/per_image.parquet"
PER_IMAGE_SCHEMA_VERSION = 2
TRIALS_FILE = "results/trials.parquet"
TRIALS_SCHEMA_VERSION = 1

SCHEMA = pa.schema(
    [
        ("sweep", pa.string()),
        ("trial_id", pa.string()),
        ("trial_name", pa.string()),
        ("objective", pa.string()),
        ("m", pa.int64()),
        ("k", pa.int64()),
        ("beta", pa.float64()),
        ("layers", pa.int64()),
        ("estimator", pa.string()),
        ("seed", pa.int64()),
        ("passes", pa.int64()),
        ("schedule", pa.string()),
        ("dataset", pa.string()),
        ("binarization", pa.string()),
        ("train_images", pa.int64()),
        ("data_files", pa.string()),
        ("eval_k", pa.int64()),
        ("eval_images", pa.int64()),
        ("comparable_to_papers", pa.bool_()),
        ("test_nll", pa.float64()),
        ("test_nll_se", pa.float64()),
        ("test_bound", pa.float64()),
        ("test_bound_name", pa.string()),
        ("train_bound", pa.float64()),
        ("valid_bound", pa.float64()),
        ("active_units", pa.list_(pa.field("element", pa.int64()))),
        ("epochs", pa.int64()),
        ("train_seconds", pa.float64()),
        ("eval_seconds", pa.float64()),
        ("device", pa.string()),
        ("checkpoint_uri", pa.string()),
        ("project_version", pa.string()),
        ("timestamp", pa.timestamp("ms", tz="UTC")),
        ("config", pa.string()),
        ("ess_mean", pa.float64()),
        ("ess_median", pa.float64()),
        ("pareto_k_above_0_7", pa.float64()),
        ("pareto_k_max", pa.float64()),
        ("noise", pa.string()),
        ("evaluation_id", pa.string()),
        ("snr_epoch", pa.int64()),
        ("snr_encoder_mean", pa.float64()),
        ("snr_encoder_median", pa.float64()),
        ("snr_decoder_mean", pa.float64()),
        ("snr_decoder_median", pa.float64()),
        ("snr", pa.string()),
        ("sweep_stage", pa.int64()),
        ("parent_trial_name", pa.string()),
        ("parent_checkpoint_uri", pa.string()),
        ("train_device", pa.string()),
        ("train_node_id", pa.string()),
        ("train_node_ip", pa.string()),
        ("train_hostname", pa.string()),
        ("train_nodes", pa.string()),
        ("eval_node_id", pa.string()),
        ("eval_node_ip", pa.string()),
        ("eval_hostname", pa.string()),
        ("eval_float32", pa.string()),
        ("eval_gpu_name", pa.string()),
        ("eval_gpu_capability", pa.string()),
        ("train_float32", pa.string()),
        ("train_gpu_name", pa.string()),
        ("train_gpu_capability", pa.string()),
        ("generator_reseeded_at", pa.int64()),
        ("rank_metric", pa.string()),
        ("rank_metric_k", pa.int64()),
        ("rank_metric_value", pa.float64()),
        ("searched", pa.string()),
        ("ais_steps", pa.int64()),
        ("ais_chains", pa.int64()),
        ("ais_start", pa.string()),
        ("ais_leapfrog", pa.int64()),
        ("ais_images", pa.int64()),
        ("ais_nll", pa.float64()),
        ("ais_nll_se", pa.float64()),
        ("ais_is_nll", pa.float64()),
        ("ais_is_nll_se", pa.float64()),
        ("ais_minus_is", pa.float64()),
        ("ais_minus_is_se", pa.float64()),
        ("ais_acceptance", pa.float64()),
        ("ais_log_weight_sd_median", pa.float64()),
        ("ais_seconds", pa.float64()),
    ],
    metadata={"iwae_sweep.schema_version": str(SCHEMA_VERSION)},
)
TRIALS_SCHEMA = pa.schema(
    [
        ("trial_id", pa.string()),
        ("trial_name", pa.string()),
        ("status", pa.string()),
        ("epochs", pa.int64()),
        ("searched", pa.string()),
        ("rank_metric", pa.string()),
        ("rank_metric_k", pa.int64()),
        ("rank_metric_value", pa.float64()),
    ],
    metadata={"iwae_sweep.trials_schema_version": str(TRIALS_SCHEMA_VERSION)},
)
PER_IMAGE_SCHEMA = pa.schema(
    [
        ("evaluation_id", pa.string()),
        ("trial_id", pa.string()),
        ("trial_name", pa.string()),
        ("checkpoint_uri", pa.string()),
        ("image", pa.int64()),
        ("nll", pa.float64()),
        ("ess", pa.float64()),
        ("pareto_k", pa.float64()),
        ("ais_nll", pa.float64()),
    ],
    metadata={"iwae_sweep.per_image_schema_version": str(PER_IMAGE_SCHEMA_VERSION)},
)


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
    eval_node: dict[str, Any]  # eval_node_id, eval_node_ip, eval_hostname
    metric: str  # what ranked the trials and checkpoints: valid_ll or valid_bound
    searched: list[str]  # the keys a search drew ([] for a grid)


def results_row(record: EvaluationRecord, result: Evaluation, ais: AISComparison | None) -> dict[str, Any]:
    """The results.parquet row (SCHEMA) of one evaluated checkpoint, with its AIS figures if any."""
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
        "beta": config.beta,
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
        "comparable_to_papers": result.comparable_to_papers and config.comparable_to_papers,
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
        "sweep_stage": 2 if config.init_from else 1,
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
        **record.eval_node,
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
    if (_version(rows, "iwae_sweep.schema_version"), _version(per_image, "iwae_sweep.per_image_schema_version")) != (
        str(SCHEMA_VERSION),
        str(PER_IMAGE_SCHEMA_VERSION),
    ):
        return {}
    _require_columns(paths[0], rows, SCHEMA.names, SCHEMA_VERSION)
    _require_columns(paths[1], per_image, PER_IMAGE_SCHEMA.names, PER_IMAGE_SCHEMA_VERSION)
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
    write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, filesystem)


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


def write_whole(data: bytes | pa.Buffer, path: str, filesystem: pafs.FileSystem) -> None:
    """`data` as the file `path`, whole or not at all: readers and a crash never see half a file,
    and a failed write (a full disk: WriteError) leaves the previous version. A local file through
    iwae_model.files.WholeFile; on an object store, which writes each object whole anyway, to a
    temp name then moved into place."""
    if is_local(filesystem):
        write_atomically(path, lambda out: out.write(data))
        return
    folder, name = path.rsplit("/", 1)
    filesystem.create_dir(folder, recursive=True)
    tmp = f"{folder}/{TEMP_PREFIX}{uuid.uuid4().hex}-{name}"
    with filesystem.open_output_stream(tmp) as out:
        out.write(data)
    filesystem.move(tmp, path)


def read_results(location: str) -> pa.Table:
    """A sweep folder's results, or a Parquet file, local or on object storage."""
    table = _read_versioned(location, RESULTS_FILE, "iwae_sweep.schema_version", SCHEMA_VERSION)
    _require_columns(location, table, SCHEMA.names, SCHEMA_VERSION)
    return table


def read_trials(location: str) -> pa.Table:
    """A sweep folder's table of trials (or that Parquet file), local or on object storage."""
    table = _read_versioned(location, TRIALS_FILE, "iwae_sweep.trials_schema_version", TRIALS_SCHEMA_VERSION)
    _require_columns(location, table, TRIALS_SCHEMA.names, TRIALS_SCHEMA_VERSION)
    return table


def read_per_image(location: str) -> pa.Table:
    """A sweep folder's per-image results (or that Parquet file), local or on object storage."""
    table = _read_versioned(location, PER_IMAGE_FILE, "iwae_sweep.per_image_schema_version", PER_IMAGE_SCHEMA_VERSION)
    _require_columns(location, table, PER_IMAGE_SCHEMA.names, PER_IMAGE_SCHEMA_VERSION)
    return table


def _read_versioned(location: str, default_file: str, key: str, version: int) -> pa.Table:
    filesystem, path = filesystem_and_path(location)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        path = f"{path.rstrip('/')}/{default_file}"
        info = filesystem.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise ResultsError(
            f"{location}: no results there (expected a Parquet file or a sweep folder "
            f"holding {default_file}; run python -m sweep.evaluate on the sweep first)"
        )
    try:
        table = pq.read_table(path, filesystem=filesystem)
        _check_readable(table)
    except (pa.ArrowException, OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError too
        raise ResultsError(
            f"{location}: not a readable Parquet file ({_first_line(error)}); re-create it with "
            f"python -m sweep.evaluate SWEEP_DIR"
        ) from None
    found = _version(table, key)
    if found is None:
        raise ResultsError(
            f"{location}: a Parquet file, but not iwae-sweep {default_file} (no {key} "
            f"in its metadata); pass SWEEP_DIR/{default_file} or the sweep folder"
        )
    if found != str(version):
        raise ResultsError(
            f"{location}: results schema version {found}, this version "
            f"reads {version}: re-create them with python -m sweep.evaluate SWEEP_DIR, or read them "
            f"with the iwae-sweep version that wrote them"
        )
    return table


def _check_readable(table: pa.Table) -> None:
    """Raise if a damaged byte that Parquet's reader let through would fail a reader later: in
    the footer's column names, in a string column (invalid UTF-8), or in a config's JSON."""
    table.validate(full=True)
    if "config" in table.schema.names:
        for config in table.column("config").to_pylist():
            if config is not None:
                json.loads(config)


def _require_columns(location: str, table: pa.Table, names: list[str], version: int) -> None:
    missing = [name for name in names if name not in table.schema.names]
    if missing:
        raise ResultsError(
            f"{location}: schema version {version} but columns {missing} are missing; the file "
            f"was edited or damaged: re-create it with python -m sweep.evaluate SWEEP_DIR"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
