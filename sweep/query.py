"""python -m sweep.query: a sweep's Parquet results as the papers' tables (sweep/tables.py).

    python -m sweep.query SWEEP_DIR_OR_PARQUET [--where objective=iwae] [--format markdown|csv|json]
                          [--plot nll_vs_k.png] [--snr-plot snr_vs_k.png] [--baseline TRIAL]
    python -m sweep.query SWEEP_DIR --compare A B
"""

from __future__ import annotations

import argparse
import sys

from iwae_model.errors import IWAEError

from .compare import comparison_text, load_per_image, select_one, where
from .results import ResultsError, read_results
from .tables import plot, render, snr_plot, summarise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sweep.query",
        description="Print a sweep's results (its Parquet file) in the papers' layout, with the published values.",
        epilog="The same file in Python: pyarrow.parquet.read_table('SWEEP_DIR/results/results.parquet').to_pandas()")
    parser.add_argument("location", help="a sweep folder, a Parquet file, or an s3://... URI of either")
    parser.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                        help="keep rows whose COLUMN equals VALUE (repeatable; e.g. objective=iwae, layers=2)")
    parser.add_argument("--format", choices=["markdown", "csv", "json"], default="markdown")
    parser.add_argument("--plot", metavar="PNG", help="also save test NLL against M*K, ours beside the papers'")
    parser.add_argument("--snr-plot", metavar="PNG",
                        help="also save encoder and decoder gradient SNR against M*K, log-log (trials trained with snr_every)")
    parser.add_argument("--baseline", metavar="TRIAL",
                        help="show in each cell the paired per-image NLL difference to this checkpoint: a trial label "
                             "or COLUMN=VALUE[,COLUMN=VALUE] naming one row")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="print NLL(A) - NLL(B) with its paired and unpaired standard errors instead of the table; "
                             "A and B as for --baseline")
    args = parser.parse_args(argv)
    try:
        frame = where(read_results(args.location).to_pandas(), args.where, "--where")
        if frame.empty:
            raise ResultsError(f"{args.location}: no rows match {' '.join(args.where)}")
        if args.compare:
            a, b = (select_one(frame, selector, what) for selector, what in zip(args.compare, ("--compare A", "--compare B")))
            print(comparison_text(a, b, load_per_image(args.location)))
            return
        baseline = (load_per_image(args.location), select_one(frame, args.baseline, "--baseline")) if args.baseline else None
        summary = summarise(frame, baseline)
        sys.stdout.write(render(frame, summary, args.format, args.baseline).rstrip("\n") + "\n")
        if args.plot:
            if summary.empty:
                raise ResultsError("--plot draws first-stage trials, and none of these rows is one")
            plot(summary, args.plot)
            print(f"plot written to {args.plot}", file=sys.stderr)
        if args.snr_plot:
            snr_plot(frame, args.snr_plot)
            print(f"SNR plot written to {args.snr_plot}", file=sys.stderr)
    except IWAEError as error:
        parser.exit(1, f"error: {error}\n")


if __name__ == "__main__":
    main()
