"""A run's checkpoint: everything needed to continue bit-identically, written atomically.

`RUN_DIR/checkpoint.pt` is a torch.save'd dict:
  format      CHECKPOINT_FORMAT
  config      TrainConfig.to_dict()
  model       model.state_dict()
  optimizer   optimizer.state_dict()
  epoch       passes completed
  step        optimizer steps completed
  rng         {"generator": training generator state, "torch": global CPU state, "cuda": [...]}
  history     the per-epoch metrics rows (the same rows as metrics.jsonl)
  train_seconds  wall-clock seconds spent in training steps so far
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .models import IWAEModel

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = "checkpoint.pt"


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """torch.save to a temp file beside `path`, fsync, then rename: a crash leaves the previous
    checkpoint intact, never half of a new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def load_checkpoint(path: str | os.PathLike, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = checkpoint_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint there (a run directory holds {CHECKPOINT_NAME})")
    state = torch.load(path, map_location=map_location, weights_only=False)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, this version reads {CHECKPOINT_FORMAT}")
    return state


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[IWAEModel, TrainConfig, dict]:
    """The trained model (in eval mode), its configuration and the raw checkpoint."""
    state = load_checkpoint(path, map_location=device)
    config = TrainConfig.from_dict(state["config"])
    model = config.build_model().to(device)
    model.load_state_dict(state["model"])
    return model.eval(), config, state
