"""python -m sweep.query: a sweep's Parquet results as the papers' tables (sweep/tables.py).

    python -m sweep.query SWEEP_DIR_OR_PARQUET [--where objective=iwae] [--format markdown|csv|json]
                          [--plot nll_vs_k.png] [--snr-plot snr_vs_k.png] [--baseline TRIAL]
    python -m sweep.query SWEEP_DIR --compare A B
    python -m sweep.query SEARCH_DIR [--importance] [--parallel-plot PNG] [--slice-plot PNG]

A search's results print as its trials, best first by the metric that ranked them, with the
values drawn (sweep/study.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from pyarrow import fs as pafs

from iwae_model.errors import IWAEError, end_without_shutdown, exit_with
from iwae_model.plugins import add_plugin_flag, load_plugin, loaded

from .compare import beside_results, comparison_text, load_per_image, select_one, where
from .folder import SPEC_FILE, read_spec
from .results import TRIALS_FILE, ResultsError, read_results, read_trials
from .space import Distribution
from .storage import filesystem_and_path
from .study import importance_text, save_plots, search_table, searched
from .tables import plot, snr_plot, summarise, table_text

if TYPE_CHECKING:
    import pandas as pd


def search_distributions(location: str) -> dict[str, Distribution]:
    """The distributions of the search in sweep folder `location` ({} for a Parquet file)."""
    filesystem, path = filesystem_and_path(location)
    if filesystem.get_file_info(f"{path}/{SPEC_FILE}").type != pafs.FileType.File:
        return {}
    space, _ = read_spec(path, filesystem)
    return space.search.distributions if space.search else {}


def require_plugins(frame: pd.DataFrame, location: str) -> None:
    """Rows made with plugins need them loaded (--plugin): their objectives' parameters and
    datasets' titles lay out the tables. Never loaded from the rows themselves: a results file
    from elsewhere could name any code to run."""
    have = {plugin.module: plugin for plugin in loaded()}
    for records in {value for value in frame.get("plugins", []) if isinstance(value, str)}:
        for record in json.loads(records):
            plugin = have.get(record["module"])
            if plugin is None:
                raise ResultsError(
                    f"{location}: rows made with plugin {record['module']} ({record['file']}): pass --plugin "
                    f"{record['file']} to lay them out (it runs that file's code)"
                )
            if plugin.sha256 != record["sha256"]:
                print(
                    f"note: rows made with {record['file']} of SHA-256 {record['sha256'][:12]}..., laid out with "
                    f"{plugin.file} of {plugin.sha256[:12]}...",
                    file=sys.stderr,
                )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sweep.query",
        description="Print a sweep's results (its Parquet file) in the papers' layout, with the published values.",
        epilog="The same file in Python: pyarrow.parquet.read_table('SWEEP_DIR/results/results.parquet').to_pandas()",
    )
    parser.add_argument("location", help="a sweep folder, a Parquet file, or an s3://... URI of either")
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="COLUMN=VALUE",
        help="keep rows whose COLUMN equals VALUE (repeatable; e.g. objective=iwae, layers=2)",
    )
    parser.add_argument("--format", choices=["markdown", "csv", "json"], default="markdown")
    parser.add_argument("--plot", metavar="PNG", help="also save test NLL against M*K, ours beside the papers'")
    parser.add_argument(
        "--snr-plot",
        metavar="PNG",
        help="also save encoder and decoder gradient SNR against M*K, log-log (trials trained with snr_every)",
    )
    parser.add_argument(
        "--baseline",
        metavar="TRIAL",
        help="show in each cell the paired per-image NLL difference to this checkpoint: a trial label "
        "or COLUMN=VALUE[,COLUMN=VALUE] naming one row",
    )
    parser.add_argument(
        "--importance",
        action="store_true",
        help="a search: each searched parameter's importance for the ranking metric (Optuna's fANOVA)",
    )
    parser.add_argument("--parallel-plot", metavar="PNG", help="a search: save its parallel-coordinates plot")
    parser.add_argument("--slice-plot", metavar="PNG", help="a search: save the ranking metric against each parameter")
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="print NLL(A) - NLL(B) with its paired and unpaired standard errors instead of the table; "
        "A and B as for --baseline",
    )
    add_plugin_flag(parser)
    args = parser.parse_args(argv)
    try:
        for spec in args.plugin:
            load_plugin(spec)
        frame = where(read_results(args.location).to_pandas(), args.where, "--where")
        require_plugins(frame, args.location)
        if frame.empty:
            raise ResultsError(f"{args.location}: no rows match {' '.join(args.where)}")
        if args.compare:
            a, b = (
                select_one(frame, selector, what)
                for selector, what in zip(args.compare, ("--compare A", "--compare B"))
            )
            print(comparison_text(a, b, load_per_image(args.location)))
            return
        if frame["searched"].notna().any():
            grid_only = [
                flag
                for flag, value in (
                    ("--where", args.where),
                    ("--plot", args.plot),
                    ("--snr-plot", args.snr_plot),
                    ("--baseline", args.baseline),
                )
                if value
            ]
            if grid_only:
                raise ResultsError(
                    f"{args.location} is a search: {', '.join(grid_only)} draw(s) the papers' tables of a "
                    f"grid; a search has its table, --importance, --parallel-plot and --slice-plot"
                )
            space = search_distributions(args.location)
            trials = read_trials(beside_results(args.location, TRIALS_FILE)).to_pandas()
            if args.format == "markdown":
                print(search_table(trials, frame))
            else:
                sys.stdout.write(
                    trials.to_csv(index=False)
                    if args.format == "csv"
                    else trials.to_json(orient="records", indent=1) + "\n"
                )
            if args.importance:
                print("\n" + importance_text(trials, space))
            if args.parallel_plot or args.slice_plot:
                save_plots(trials, args.parallel_plot, args.slice_plot, space)
                print(
                    f"plot(s) written: {', '.join(filter(None, (args.parallel_plot, args.slice_plot)))}",
                    file=sys.stderr,
                )
            return
        if args.importance or args.parallel_plot or args.slice_plot:
            searched(frame)  # the error: not a search
        baseline = (
            (load_per_image(args.location), select_one(frame, args.baseline, "--baseline")) if args.baseline else None
        )
        summary = summarise(frame, baseline)
        sys.stdout.write(table_text(frame, summary, args.format, args.baseline).rstrip("\n") + "\n")
        if args.plot:
            if summary.empty:
                raise ResultsError("--plot draws first-stage trials, and none of these rows is one")
            plot(summary, args.plot)
            print(f"plot written to {args.plot}", file=sys.stderr)
        if args.snr_plot:
            snr_plot(frame, args.snr_plot)
            print(f"SNR plot written to {args.snr_plot}", file=sys.stderr)
    except IWAEError as error:
        exit_with(error)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as ended:
        end_without_shutdown(ended)
