"""python -m iwae_model.train: train one model (iwae_model/training.py) from the command line.

    python -m iwae_model.train --layers 1 --objective iwae --k 5 --passes 3 --out RUN_DIR

Every training setting is a flag: TrainConfig's fields and the objectives' parameters.
Running the same command again resumes the run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .checkpoint import CheckpointError, load_checkpoint
from .config import TrainConfig, settings
from .device import resolve_device
from .errors import IWAEError, exit_with
from .plugins import PluginError, add_plugin_flag, load_flagged_plugins
from .training import train

CLI_TYPES = {
    "int": int,
    "float": float,
    "str": str,
    "int | None": int,
    "str | None": str,
    "tuple[int, ...] | None": int,
}


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """The command line: one flag per TrainConfig field (its help kept with the field), and the
    run's folder, data, device and progress bar."""
    p = argparse.ArgumentParser(
        prog="python -m iwae_model.train",
        description="Train one model with Burda et al.'s protocol; resumable (run the same command again).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    try:
        load_flagged_plugins(argv)
    except PluginError as error:
        p.error(str(error))
    p.add_argument("--out", required=True, help="run directory (checkpoint.pt, metrics.jsonl)")
    add_plugin_flag(p)
    for setting in settings():
        if setting.name == "init_label":  # read from the --init-from run's checkpoint
            continue
        flag = "--" + setting.name.replace("_", "-")
        if setting.type == "bool":
            p.add_argument(flag, action="store_true", help=setting.help)
            continue
        options = {"nargs": "+"} if setting.type.startswith("tuple") else {}
        kind = CLI_TYPES[setting.type]
        p.add_argument(flag, type=kind, default=setting.default, help=setting.help, **options, **setting.options)
    p.add_argument(
        "--data-dir",
        default=None,
        help="data folder, every dataset's files (default: $IWAE_DATA_DIR, then ~/.cache/iwae-sweep/data)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    values = {s.name: getattr(args, s.name) for s in settings() if s.name != "init_label"}
    try:
        if args.init_from:
            values.update(init_from=str(Path(args.init_from).resolve()), init_label=parent_label(args.init_from))
        config = TrainConfig(**values)
    except (ValueError, CheckpointError) as exc:
        p.error(str(exc))
    return config, args


def parent_label(init_from: str) -> str:
    """The label of the run a continued run starts from (read from its checkpoint)."""
    return TrainConfig.from_dict(load_checkpoint(init_from)["config"]).label()


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        history = train(config, args.out, data_dir=args.data_dir, device=device, progress=not args.no_progress)
    except IWAEError as error:
        exit_with(error)
    last = history[-1]
    print(json.dumps({"run_dir": str(Path(args.out).resolve()), "label": config.label(), **last}))


if __name__ == "__main__":
    main()
