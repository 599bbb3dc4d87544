"""The sweep's results as Parquet: one row per evaluated checkpoint, a versioned schema.

Load them without this package:

    import pyarrow.parquet as pq
    table = pq.read_table("SWEEP_DIR/results/results.parquet")   # or .to_pandas()

Schema version 1 (`iwae_sweep.schema_version` in the file's metadata):
  sweep, trial_id, trial_name        the sweep's name; Ray's trial id; the configuration label
  objective, m, k, beta, layers, estimator, seed, passes, schedule, binarization, train_images
                                     the trial's configuration (train_images null: all 59,600)
  eval_k, eval_images                importance samples and test images of the NLL estimate
  comparable_to_papers               dynamic binarization, full training set, k >= 5000, all 10,000 test images
  test_nll, test_nll_se              -mean log p(x) over the test images (nats) and its standard error
  test_bound, test_bound_name        the training objective's bound on the same images, e.g. IWAE(K=5)
  train_bound, valid_bound           at the evaluated checkpoint's last pass
  active_units                       per stochastic layer (Burda: var of posterior mean > 0.01)
  epochs, train_seconds              passes trained and wall-clock training seconds at the checkpoint
  eval_seconds, device               the evaluation's wall clock and device
  checkpoint_uri                     where the evaluated checkpoint lies
  project_version, timestamp         iwae-sweep version; UTC time of the evaluation
  config                             the trial's whole iwae_model.TrainConfig as JSON (lr, schedule, ...)
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

SCHEMA_VERSION = 1
RESULTS_FILE = "results/results.parquet"

SCHEMA = pa.schema(
    [
        ("sweep", pa.string()), ("trial_id", pa.string()), ("trial_name", pa.string()),
        ("objective", pa.string()), ("m", pa.int64()), ("k", pa.int64()), ("beta", pa.float64()),
        ("layers", pa.int64()), ("estimator", pa.string()), ("seed", pa.int64()), ("passes", pa.int64()),
        ("schedule", pa.string()), ("binarization", pa.string()), ("train_images", pa.int64()),
        ("eval_k", pa.int64()), ("eval_images", pa.int64()), ("comparable_to_papers", pa.bool_()),
        ("test_nll", pa.float64()), ("test_nll_se", pa.float64()),
        ("test_bound", pa.float64()), ("test_bound_name", pa.string()),
        ("train_bound", pa.float64()), ("valid_bound", pa.float64()),
        ("active_units", pa.list_(pa.field("element", pa.int64()))), ("epochs", pa.int64()), ("train_seconds", pa.float64()),
        ("eval_seconds", pa.float64()), ("device", pa.string()), ("checkpoint_uri", pa.string()),
        ("project_version", pa.string()), ("timestamp", pa.timestamp("ms", tz="UTC")), ("config", pa.string()),
    ],
    metadata={"iwae_sweep.schema_version": str(SCHEMA_VERSION)},
)


class ResultsError(ValueError):
    """A file that is not iwae-sweep results this version reads; the message names it and the fix."""


def write_results(rows: list[dict[str, Any]], path: str, filesystem: pafs.FileSystem) -> None:
    """Write to a temp name beside `path`, then move it into place: readers never see half a
    file (on object stores each object is written whole anyway)."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    folder = path.rsplit("/", 1)[0]
    filesystem.create_dir(folder, recursive=True)
    tmp = f"{folder}/.tmp-{uuid.uuid4().hex}.parquet"
    pq.write_table(table, tmp, filesystem=filesystem)
    filesystem.move(tmp, path)


def filesystem_and_path(location: str) -> tuple[pafs.FileSystem, str]:
    """A local path or a URI (s3://bucket/path?endpoint_override=...) as pyarrow's pair."""
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def read_results(location: str) -> pa.Table:
    """A sweep folder's results, or a Parquet file, local or on object storage."""
    filesystem, path = filesystem_and_path(location)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        path = f"{path.rstrip('/')}/{RESULTS_FILE}"
        info = filesystem.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{location}: no results there (expected a Parquet file or a sweep folder "
                                f"holding {RESULTS_FILE}; run python -m sweep.evaluate on the sweep first)")
    try:
        table = pq.read_table(path, filesystem=filesystem)
    except (pa.ArrowException, OSError) as error:
        raise ResultsError(f"{location}: not a readable Parquet file ({_first_line(error)}); re-create it with "
                           f"python -m sweep.evaluate SWEEP_DIR") from None
    version = (table.schema.metadata or {}).get(b"iwae_sweep.schema_version")
    if version is None:
        raise ResultsError(f"{location}: a Parquet file, but not iwae-sweep results (no iwae_sweep.schema_version "
                           f"in its metadata); pass SWEEP_DIR/{RESULTS_FILE} or the sweep folder")
    if version != str(SCHEMA_VERSION).encode():
        raise ResultsError(f"{location}: results schema version {version.decode(errors='replace')}, this version "
                           f"reads {SCHEMA_VERSION}: re-create them with python -m sweep.evaluate SWEEP_DIR, or read "
                           f"them with the iwae-sweep version that wrote them")
    missing = [name for name in SCHEMA.names if name not in table.schema.names]
    if missing:
        raise ResultsError(f"{location}: schema version {SCHEMA_VERSION} but columns {missing} are missing; the file "
                           f"was edited or damaged: re-create it with python -m sweep.evaluate SWEEP_DIR")
    return table


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
