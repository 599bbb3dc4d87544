"""PyTorch's private APIs that iwae_model relies on, in one place. Each was checked against torch
2.13.0, the pinned version; tests/test_private_apis.py fails on a torch where one is gone."""

from __future__ import annotations

CHECKED_WITH = "2.13.0"


def deterministic_inductor() -> None:
    """Inductor otherwise picks among kernel variants by timing them when it compiles: a resumed
    run could pick others, and sum in another order. A process-wide setting."""
    import torch._inductor.config  # imported here: it loads the compiler stack

    torch._inductor.config.deterministic = True
