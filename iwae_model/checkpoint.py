"""A run's checkpoint: everything needed to continue bit-identically, written atomically and
read without unpickling code.

`RUN_DIR/checkpoint.pt` is a torch.save'd dict of tensors and plain containers only, so it
loads with `torch.load(weights_only=True)`: checkpoints come from buckets and other people's
sweeps, and a full pickle there could run code on load.
  format         CHECKPOINT_FORMAT
  config         TrainConfig.to_dict()
  model          model.state_dict()
  optimizer      optimizer.state_dict(), as torch saves it
  epoch          passes completed (at least 1: a checkpoint is written after each pass)
  step           optimizer steps completed
  rng            {"generator": the training generator's state (uint8 tensor), "device": its device
                 type, "cpu" or "cuda"}: training draws from that generator alone
  history        the per-epoch metrics rows (the same rows as metrics.jsonl), one per pass
  train_seconds  wall-clock seconds spent in training steps so far
  plugins        only where plugins define the objective or dataset: [{module, file, sha256}]

Every way a file can fail to be such a checkpoint (missing, empty, truncated, not torch's
format, carrying code, another format version, a field of the wrong type, weights that do not
fit the configuration) raises CheckpointError naming the file, the field and the fix.

Format 1 also kept torch's global CPU and CUDA RNG states, which training never draws from after
the model is built; it still loads (its generator's device told by the state's layout: a CUDA
generator's is 16 bytes, a CPU one's 5,056).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .errors import IWAEError
from .files import write_atomically
from .models import IWAEModel
from .plugins import loaded

CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)
CUDA_GENERATOR_STATE_BYTES = 16  # a Philox seed and offset
CHECKPOINT_NAME = "checkpoint.pt"
FIELDS: dict[str, type | tuple[type, ...]] = {
    "config": dict,
    "model": dict,
    "optimizer": dict,
    "epoch": int,
    "step": int,
    "rng": dict,
    "history": list,
    "train_seconds": (int, float),
}
HISTORY_NUMBERS = ("train_bound", "valid_bound")  # what the evaluation reads from the last row


class CheckpointError(IWAEError, ValueError):
    """A file that is not a checkpoint this version can use; the message names the file, the
    field and the fix."""


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], durable: bool = True) -> None:
    """torch.save to a temp file beside `path`, fsync, then rename: a crash leaves the previous
    checkpoint intact, never half of a new one. Not `durable`: still whole, but not fsynced (a
    folder that is handed to Ray and deleted)."""
    write_atomically(path, lambda out: torch.save({"format": CHECKPOINT_FORMAT, **state}, out), durable)


def load_checkpoint(path: str | os.PathLike, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """The checkpoint at `path` (a file, or a run directory holding one), its fields checked."""
    path = Path(path)
    if path.is_dir():
        path = checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no checkpoint there (a run directory holds {CHECKPOINT_NAME}, "
            f"written by python -m iwae_model.train after each pass)"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint; copy it again from where the run wrote it")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if named:
            raise CheckpointError(
                f"{path}: refused: it carries the Python object {named.group(1)}, not only tensors and plain "
                f"containers. iwae-sweep checkpoints never do, and unpickling such a file could run code, so it "
                f"was not loaded. Use checkpoints written by iwae-sweep."
            ) from None
        raise CheckpointError(
            f"{path}: not a torch checkpoint file (its pickle has content torch's safe loader "
            f"does not accept); pass a checkpoint.pt written by iwae-sweep"
        ) from None
    except Exception as error:  # noqa: BLE001 -- any failure to parse an untrusted file means the same: damaged
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(error).__name__}: {_summary(error)}); the file is "
            f"truncated, damaged or not a torch file: copy it again, or resume from an earlier one"
        ) from None
    check_state(state, path)
    return state


def check_state(state: Any, path: str | os.PathLike) -> None:
    """Raise CheckpointError unless `state` has every field of this format, of the right type."""

    def bad(field: str, problem: str) -> CheckpointError:
        return CheckpointError(
            f"{path}: field {field!r}: {problem}; the file is damaged or was not written by "
            f"iwae-sweep: copy it again, or resume from an earlier checkpoint"
        )

    if not isinstance(state, dict) or "format" not in state:
        what = (
            f"a dict with keys {sorted(map(str, state))[:8]}"
            if isinstance(state, dict)
            else f"a {type(state).__name__}"
        )
        raise CheckpointError(
            f"{path}: not an iwae-sweep checkpoint (it holds {what}, not the 'format', 'config', "
            f"'model', ... of a run); pass a run directory written by python -m iwae_model.train"
        )
    version = state["format"]
    is_int = isinstance(version, int) and not isinstance(version, bool)
    if not (is_int and version in READABLE_FORMATS):
        newer = is_int and version > CHECKPOINT_FORMAT
        fix = (
            "upgrade iwae-sweep to read it"
            if newer
            else "load it with the iwae-sweep version that wrote it, or retrain"
        )
        raise CheckpointError(
            f"{path}: checkpoint format {version!r}, this version reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}: {fix}"
        )
    for field, kind in FIELDS.items():
        if field not in state:
            raise bad(field, "missing")
        if not isinstance(state[field], kind) or isinstance(state[field], bool):
            raise bad(field, f"a {type(state[field]).__name__}, expected {_names(kind)}")
    for name, value in state["model"].items():
        if not isinstance(value, torch.Tensor):
            raise bad(f"model.{name}", f"a {type(value).__name__}, expected a tensor")
    for name in ("generator", "torch") if version == 1 else ("generator",):
        value = state["rng"].get(name)
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
            raise bad(f"rng.{name}", "expected a uint8 tensor (a torch RNG state)")
    if version == 1:  # read as format 2: the generator's device from its state's layout
        generator = state["rng"]["generator"]
        state["rng"] = {
            "generator": generator,
            "device": "cuda" if generator.numel() == CUDA_GENERATOR_STATE_BYTES else "cpu",
        }
    if state["rng"].get("device") not in ("cpu", "cuda"):
        raise bad(
            "rng.device", f"{state['rng'].get('device')!r}, expected 'cpu' or 'cuda' (the training generator's device)"
        )
    check_plugins(state, path, bad)
    try:
        config = TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as error:
        raise bad("config", str(error)) from None
    epoch, history = state["epoch"], state["history"]
    if not 1 <= epoch <= config.passes:
        raise bad("epoch", f"{epoch}, expected 1..{config.passes} passes")
    if len(history) != epoch:
        raise bad("history", f"{len(history)} rows, but field 'epoch' says {epoch} passes (one row each)")
    for index, row in enumerate(history):
        if not isinstance(row, dict) or type(row.get("epoch")) is not int or row["epoch"] != index + 1:
            raise bad(f"history[{index}]", f"expected the metrics row of pass {index + 1}")
        for name in HISTORY_NUMBERS:
            if not isinstance(row.get(name), (int, float)) or isinstance(row.get(name), bool):
                raise bad(f"history[{index}].{name}", f"{row.get(name)!r}, expected a number")


def rng_state(generator: torch.Generator) -> dict:
    return {"generator": generator.get_state(), "device": generator.device.type}


def restore(
    state: dict[str, Any],
    path: str | os.PathLike,
    model: IWAEModel,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """Load a checked checkpoint's weights (and optimizer and generator states) into these
    objects. The generator's state is loaded only if it was saved on the same device type (the
    caller reseeds it otherwise: a CPU and a CUDA generator's states do not convert)."""

    def load_optimizer() -> None:
        optimizer.load_state_dict(state["optimizer"])
        _check_optimizer_shapes(optimizer)

    parts = [("model", lambda: model.load_state_dict(state["model"]))]
    parts += [("optimizer", load_optimizer)] if optimizer is not None else []
    if generator is not None and state["rng"]["device"] == generator.device.type:
        parts += [("rng", lambda: generator.set_state(state["rng"]["generator"].cpu()))]
    for field, load in parts:
        try:
            load()
        except Exception as error:  # noqa: BLE001 -- torch raises many types for a state that does not fit
            raise CheckpointError(
                f"{path}: field {field!r} does not fit the configuration the checkpoint names "
                f"({type(error).__name__}: {_summary(error)}); the file is damaged or was edited: copy it again, "
                f"or resume from an earlier checkpoint"
            ) from None


def _check_optimizer_shapes(optimizer: torch.optim.Optimizer) -> None:
    # load_state_dict accepts moment tensors of any shape; the first step would then fail.
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(
                        f"optimizer state {name!r} has shape {tuple(value.shape)}, its parameter {tuple(param.shape)}"
                    )


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[IWAEModel, TrainConfig, dict]:
    """The trained model (in eval mode), its configuration and the raw checkpoint."""
    state = load_checkpoint(path, map_location=device)
    config = TrainConfig.from_dict(state["config"])
    model = config.build_model().to(device)
    restore(state, path, model)
    return model.eval(), config, state


def check_plugins(state: dict[str, Any], path: str | os.PathLike, bad: Any) -> None:
    """A checkpoint of a plugin's objective or dataset needs that plugin loaded, with the code
    that trained it."""
    records = state.get("plugins", [])
    keys = ("module", "file", "sha256")
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and all(isinstance(r.get(k), str) for k in keys) for r in records
    ):
        raise bad(
            "plugins", "expected a list of {module, file, sha256}: the plugins defining its objective and dataset"
        )
    for record in records:
        found = next((p for p in loaded() if p.module == record["module"]), None)
        if found is None:
            raise CheckpointError(
                f"{path}: trained with plugin {record['module']} ({record['file']}), which defines its objective "
                f"or dataset: pass --plugin {record['file']}"
            )
        if found.sha256 != record["sha256"]:
            raise CheckpointError(
                f"{path}: trained with plugin {record['file']} of SHA-256 {record['sha256'][:12]}..., but the "
                f"loaded {found.file} is {found.sha256[:12]}...: load the code that trained it"
            )


def _summary(error: BaseException) -> str:
    """The error's text on one line, short: torch's messages put the detail on later lines."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text[:300] or "no message"


def _names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)
