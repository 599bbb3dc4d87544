"""Re-run a finished sweep's evaluation stage (sweep/evaluation.py) alone, e.g. with another k:

    python -m sweep.evaluate SWEEP_DIR [--k 5000] [--images N] [--eval-gpus G] [--eval-actors A]

Every selected checkpoint is evaluated anew; the new Parquet replaces the old one atomically.
The sweep's trials are read from its JSON files and its checkpoints with weights only
(sweep.saved_trials): nothing in the folder is unpickled, so a folder from anyone can be evaluated.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from iwae_model.errors import IWAEError, exit_with

from .cluster import check_gpus, init_ray, plugin_environment
from .evaluation import evaluate_sweep
from .folder import SweepFolderError, read_spec
from .results import RESULTS_FILE
from .saved_trials import load_grids
from .storage import filesystem_and_path
from .tables import print_results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sweep.evaluate",
        description="Re-run a finished sweep's evaluation stage: the k-sample test log-likelihood of its best "
        "checkpoints, written to SWEEP_DIR/" + RESULTS_FILE + " (replacing the old file).",
    )
    parser.add_argument("sweep_dir", help="the sweep folder (<storage>/<name>), a local path or s3://... URI")
    parser.add_argument("--k", type=int, default=None, help="importance samples (default: the space file's, 5000)")
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help="first N test images (default: the space file's, null: the whole test set)",
    )
    parser.add_argument("--eval-gpus", type=float, default=None, help="GPUs per evaluation (default: the space file's)")
    parser.add_argument(
        "--eval-actors",
        type=int,
        default=None,
        help="evaluations running at once, sharing the cores (default: the space file's)",
    )
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: start a local Ray)")
    args = parser.parse_args(argv)
    for name in ("k", "images", "eval_actors"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    try:
        grids = load_grids(args.sweep_dir)
        filesystem, folder = filesystem_and_path(args.sweep_dir)
        space, data_dir = read_spec(folder, filesystem)  # it loads the plugins the trials' objectives need
    except SweepFolderError as error:
        exit_with(error)
    evaluation = replace(
        space.evaluation,
        k=args.k or space.evaluation.k,
        images=args.images if args.images is not None else space.evaluation.images,
    )
    space = replace(space, evaluation=evaluation)
    start = time.perf_counter()
    try:
        init_ray(args.address, plugin_environment(space.plugins))
        check_gpus(0, args.eval_gpus if args.eval_gpus is not None else space.resources.eval_gpus)
        path, rows = evaluate_sweep(
            grids, folder, filesystem, space, data_dir, args.eval_gpus, args.eval_actors, keep=False
        )
    except IWAEError as error:
        exit_with(error)
    print_results(rows, path)
    print(f"Evaluation wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
