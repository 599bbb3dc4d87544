"""results.parquet from elsewhere: every file that is not our results gets an error naming it
and the fix, from the library and from the CLIs, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sweep import columns
from sweep.columns import RESULTS
from sweep.results import ResultsError, read_results, write_results


def good_rows():
    return [{**dict.fromkeys(RESULTS.arrow().names), "trial_name": "iwae_L1_M1_K5_s0", "objective": "iwae"}]


def write_bad(path, kind):
    table = pa.Table.from_pylist(good_rows(), schema=RESULTS.arrow())
    if kind == "text":
        path.write_text("trial,nll\n1,2\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not ours":
        pq.write_table(pa.table({"a": [1, 2]}), path)
    elif kind == "other version":
        pq.write_table(table.replace_schema_metadata({"iwae_sweep.schema_version": "7"}), path)
    elif kind == "missing columns":
        pq.write_table(table.drop_columns(["test_nll"]), path)


@pytest.mark.parametrize(
    "kind, words",
    [
        ("text", ["not a readable Parquet file", "sweep.evaluate"]),
        ("empty", ["not a readable Parquet file"]),
        ("not ours", ["not iwae-sweep results", "schema_version"]),
        ("other version", ["schema version 7", "reads 6"]),
        ("missing columns", ["['test_nll'] are missing"]),
    ],
)
def test_bad_parquet_files_are_named_with_the_fix(tmp_path, kind, words):
    path = tmp_path / "results.parquet"
    write_bad(path, kind)
    with pytest.raises(ResultsError) as error:
        read_results(str(path))
    assert str(error.value).startswith(str(path)) and all(w in str(error.value) for w in words), str(error.value)
    cli = subprocess.run([sys.executable, "-m", "sweep.query", str(path)], capture_output=True, text=True)
    assert cli.returncode == 1 and "Traceback" not in cli.stderr and words[0] in cli.stderr, cli.stderr


def test_our_file_reads_back(tmp_path):
    from pyarrow import fs as pafs

    write_results(good_rows(), str(tmp_path / "results" / "results.parquet"), pafs.LocalFileSystem())
    assert read_results(str(tmp_path)).column("trial_name").to_pylist() == ["iwae_L1_M1_K5_s0"]


def test_sweep_evaluate_on_a_file_or_a_plain_folder_says_what_it_needs(tmp_path):
    write_bad(tmp_path / "results.parquet", "not ours")
    for location in (tmp_path / "results.parquet", tmp_path):
        cli = subprocess.run([sys.executable, "-m", "sweep.evaluate", str(location)], capture_output=True, text=True)
        assert cli.returncode == 1 and "Traceback" not in cli.stderr, cli.stderr
        assert f"{location}: not a Ray Tune sweep folder" in cli.stderr


def test_the_column_documentation_is_made_from_the_schemas():
    assert (Path(__file__).resolve().parents[1] / "docs" / "columns.md").read_text() == columns.markdown(), (
        "docs/columns.md is stale: python -m sweep.columns > docs/columns.md"
    )
    for schema in columns.SCHEMAS:
        names = [column.name for column in schema.columns]
        assert len(set(names)) == len(names) and all(column.description for column in schema.columns)
