"""Which torch device a command runs on."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when torch sees a GPU, else the CPU; `cuda` without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch here; use --device cpu or auto")
    return torch.device(name)
